//! Actions the image declares: one TOML file per action in `actions.dir`
//! (default `/etc/edgebind/actions.d`), named `NAME.toml` after the action.
//!
//! ```toml
//! description = "Check the sensors"
//! program = "/usr/libexec/edgebind-actions/selftest"   # absolute; run without a shell
//! timeout_s = 30              # default 60, 1..=86400: killed (process group) after this
//! user = "selftest"           # optional: see below
//! output_limit_bytes = 16384  # default 16384, at most 65536, for stdout and for stderr each
//! idempotent = false          # default false: never run twice for one command id
//! writable_paths = ["/var/lib/selftest"]  # the only places it may write
//! positional = ["target"]     # these arguments are passed positionally, in this order, after `--`
//!
//! [args.level]                # passed as --level=VALUE
//! type = "string"             # string, integer or bool
//! allowed = ["quick", "full"] # string: the only values accepted (empty: any, up to max_len)
//! required = true
//!
//! [args.count]
//! type = "integer"
//! min = 1
//! max = 5
//! ```
//!
//! Unknown keys are errors. A file that cannot be read or parsed, or that
//! breaks a rule (relative program path, a program that is not there, an
//! integer without a range…), is logged with its path and skipped: it never
//! stops the agent. Only declared arguments reach the program, each as one
//! argv word (`--name=value`, or positional).
//!
//! Confinement (fail closed): a declared action runs only as a transient
//! systemd unit or in the fallback sandbox with Landlock, which hold its
//! writes to `writable_paths`. A device offering neither (decided once at
//! start, [`Confinement::decide`], and logged as an error) rejects every
//! command for a declared action with the reason, unless its configuration
//! sets `actions.allow_unconfined = true`.
//!
//! `user`: when the agent is root, the program runs as this user (default
//! `nobody`); an agent that is not root runs it as itself, and a definition
//! naming another user is refused when the command comes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgebind_protocol::actions::{Action, ActionSpec, ArgSpec, ArgType, Origin, render_arg};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{Builtin, Facts, Job, Plan};
use crate::config::ActionsConfig;
use crate::runner::{Confinement, ProgramSpec, RunAs, Sandbox};

const MAX_DEFINITION_BYTES: u64 = 64 * 1024;
const TIMEOUT_RANGE_S: (u64, u64) = (1, 86_400);
const MAX_OUTPUT_LIMIT: usize = 64 * 1024;

/// One definition file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    #[serde(default)]
    pub description: Option<String>,
    pub program: PathBuf,
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default = "default_output_limit")]
    pub output_limit_bytes: usize,
    #[serde(default)]
    pub idempotent: bool,
    #[serde(default)]
    pub writable_paths: Vec<PathBuf>,
    #[serde(default)]
    pub positional: Vec<String>,
    #[serde(default)]
    pub args: BTreeMap<String, ArgDef>,
}

fn default_timeout() -> u64 {
    60
}
fn default_output_limit() -> usize {
    16 * 1024
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefType {
    String,
    Integer,
    Bool,
}

/// `[args.NAME]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArgDef {
    #[serde(rename = "type")]
    pub ty: DefType,
    #[serde(default)]
    pub allowed: Vec<String>,
    #[serde(default)]
    pub max_len: Option<usize>,
    #[serde(default)]
    pub min: Option<i64>,
    #[serde(default)]
    pub max: Option<i64>,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub description: Option<String>,
}

/// A declared action, checked and ready to run.
#[derive(Debug, Clone)]
pub struct Declared {
    spec: ActionSpec,
    def: Definition,
    confinement: Confinement,
}

/// Parse and check one definition; the error says which key is wrong.
/// `confinement`: how this device runs declared actions.
pub fn parse(name: &str, text: &str, confinement: Confinement) -> Result<Declared, String> {
    let name = Action::new(name)?;
    let def: Definition = toml::from_str(text).map_err(|e| e.message().trim().to_owned())?;
    if !def.program.is_absolute() {
        return Err(format!(
            "program {:?} must be an absolute path",
            def.program.display()
        ));
    }
    let (lo, hi) = TIMEOUT_RANGE_S;
    if !(lo..=hi).contains(&def.timeout_s) {
        return Err(format!(
            "timeout_s {} is outside {lo}..={hi}",
            def.timeout_s
        ));
    }
    if def.output_limit_bytes > MAX_OUTPUT_LIMIT {
        return Err(format!(
            "output_limit_bytes {} is above {MAX_OUTPUT_LIMIT}",
            def.output_limit_bytes
        ));
    }
    if let Some(p) = def.writable_paths.iter().find(|p| !p.is_absolute()) {
        return Err(format!("writable_paths: {:?} is not absolute", p.display()));
    }
    if let Some(u) = &def.user
        && (u.is_empty() || u.contains(['/', '\0', ' ', '=']))
    {
        return Err(format!("user {u:?} is not a user name"));
    }
    let mut args = BTreeMap::new();
    for (arg, d) in &def.args {
        edgebind_protocol::actions::check_name("argument name", arg)?;
        let ty = match d.ty {
            DefType::String => {
                if d.min.is_some() || d.max.is_some() {
                    return Err(format!("args.{arg}: min/max are for integers"));
                }
                ArgType::String {
                    allowed: d.allowed.clone(),
                    max_len: d.max_len.unwrap_or(256).min(4096),
                }
            }
            DefType::Integer => {
                let (Some(min), Some(max)) = (d.min, d.max) else {
                    return Err(format!("args.{arg}: an integer needs min and max"));
                };
                if min > max || !d.allowed.is_empty() || d.max_len.is_some() {
                    return Err(format!(
                        "args.{arg}: needs min <= max and neither allowed nor max_len"
                    ));
                }
                ArgType::Integer { min, max }
            }
            DefType::Bool => {
                if d.min.is_some() || d.max.is_some() || !d.allowed.is_empty() {
                    return Err(format!("args.{arg}: a bool takes no min, max or allowed"));
                }
                ArgType::Bool
            }
        };
        args.insert(
            arg.clone(),
            ArgSpec {
                ty,
                required: d.required,
                description: d.description.clone(),
            },
        );
    }
    if let Some(p) = def.positional.iter().find(|p| !def.args.contains_key(*p)) {
        return Err(format!("positional: {p:?} is not a declared argument"));
    }
    let spec = ActionSpec {
        name,
        origin: Origin::Declared,
        description: def.description.clone(),
        args,
        idempotent: def.idempotent,
        timeout_s: def.timeout_s,
        result: Some("{exit_code, stdout, stderr, duration_ms, sandbox}".into()),
    };
    Ok(Declared {
        spec,
        def,
        confinement,
    })
}

/// Every usable definition in `dir`, sorted by name; the others are logged.
pub fn load_dir(dir: &Path, cfg: &ActionsConfig) -> Vec<Declared> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!(dir = %dir.display(), "no actions directory; no declared actions");
            return Vec::new();
        }
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot read the actions directory (actions.dir); no declared actions");
            return Vec::new();
        }
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Vec::new();
    }
    let confinement = Confinement::decide(
        Sandbox::resolve(cfg.sandbox),
        crate::runner::landlock_abi(),
        cfg.allow_unconfined,
    );
    match &confinement {
        Confinement::Refused(why) => {
            tracing::error!(dir = %dir.display(), "declared actions will be rejected: {why}");
        }
        Confinement::Unconfined => {
            tracing::warn!(
                dir = %dir.display(),
                "declared actions run WITHOUT write confinement (no transient unit, no Landlock; actions.allow_unconfined = true): only file permissions limit them"
            );
        }
        Confinement::TransientUnit | Confinement::Landlock => {
            tracing::info!(dir = %dir.display(), confinement = ?confinement, "declared actions are confined");
        }
    }
    let mut out = Vec::new();
    for path in paths {
        match load_file(&path, confinement.clone()) {
            Ok(d) => {
                tracing::info!(action = %d.spec.name, file = %path.display(), "declared action");
                out.push(d);
            }
            Err(why) => {
                tracing::warn!(file = %path.display(), error = %why, "skipping action definition: {why}");
            }
        }
    }
    out
}

fn load_file(path: &Path, confinement: Confinement) -> Result<Declared, String> {
    use std::io::Read;
    let name = path
        .file_stem()
        .and_then(|s| s.to_str())
        .ok_or("file name is not UTF-8")?;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_DEFINITION_BYTES).read_to_string(&mut text))
        .map_err(|e| e.to_string())?;
    let d = parse(name, &text, confinement)?;
    match std::fs::metadata(&d.def.program) {
        Ok(m) if m.is_file() => Ok(d),
        Ok(_) => Err(format!("program {} is not a file", d.def.program.display())),
        Err(e) => Err(format!("program {}: {e}", d.def.program.display())),
    }
}

impl Declared {
    /// The program's argv for checked `args`.
    pub fn argv(&self, args: &Map<String, Value>) -> Vec<String> {
        let mut argv = vec![self.def.program.display().to_string()];
        for (name, value) in args {
            if !self.def.positional.contains(name) {
                argv.push(format!("--{name}={}", render_arg(value)));
            }
        }
        let positional: Vec<String> = self
            .def
            .positional
            .iter()
            .filter_map(|p| args.get(p).map(render_arg))
            .collect();
        if !positional.is_empty() {
            argv.push("--".into());
            argv.extend(positional);
        }
        argv
    }
}

impl Builtin for Declared {
    fn spec(&self) -> ActionSpec {
        self.spec.clone()
    }

    fn plan(&self, _: &Facts, args: &Map<String, Value>) -> Result<Plan, String> {
        if let Confinement::Refused(why) = &self.confinement {
            // Loud on every refused command, not only at start: whoever reads
            // the journal after a failed send finds the reason beside it.
            tracing::error!(action = %self.spec.name, "declared action rejected: {why}");
            return Err(why.clone());
        }
        Ok(Plan::Run(Job::Program(ProgramSpec {
            action: self.spec.name.to_string(),
            argv: self.argv(args),
            run_as: match &self.def.user {
                Some(u) => RunAs::User(u.clone()),
                None => RunAs::Unprivileged,
            },
            timeout: Duration::from_secs(self.def.timeout_s),
            output_limit: self.def.output_limit_bytes,
            writable: self.def.writable_paths.clone(),
            sandbox: self.confinement.sandbox(),
            require_landlock: self.confinement == Confinement::Landlock,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SELFTEST: &str = r#"
description = "Check the sensors"
program = "/bin/echo"
timeout_s = 5
positional = ["target"]

[args.level]
type = "string"
allowed = ["quick", "full"]
required = true

[args.count]
type = "integer"
min = 1
max = 5

[args.target]
type = "string"
"#;

    #[test]
    fn a_definition_becomes_a_spec_and_an_argv_without_a_shell() {
        let d = parse("selftest", SELFTEST, Confinement::Landlock).unwrap();
        let spec = d.spec();
        assert_eq!(spec.origin, Origin::Declared);
        assert!(!spec.idempotent);
        assert_eq!(spec.timeout_s, 5);
        assert_eq!(spec.args.len(), 3);
        let args = json!({"level": "full", "count": 2, "target": "a; rm -rf /"});
        let argv = d.argv(args.as_object().unwrap());
        assert_eq!(
            argv,
            [
                "/bin/echo",
                "--count=2",
                "--level=full",
                "--",
                "a; rm -rf /"
            ]
        );
    }

    #[test]
    fn without_confinement_a_declared_action_is_rejected_and_never_planned_to_run() {
        let facts = crate::actions::tests::facts();
        let args = json!({"level": "quick"});
        let args = args.as_object().unwrap();
        let refused = Confinement::decide(Sandbox::Fallback, -1, false);
        let d = parse("selftest", SELFTEST, refused).unwrap();
        // Still listed (the fleet sees what the image declares)...
        assert_eq!(d.spec().name.as_str(), "selftest");
        // ...but a command for it is rejected with the reason and the knob.
        let err = d.plan(&facts, args).unwrap_err();
        assert!(err.contains("cannot confine declared actions"), "{err}");
        assert!(err.contains("actions.allow_unconfined"), "{err}");

        let program =
            |c: Confinement| match parse("selftest", SELFTEST, c).unwrap().plan(&facts, args) {
                Ok(Plan::Run(Job::Program(p))) => p,
                other => panic!("{other:?}"),
            };
        let p = program(Confinement::Landlock);
        assert_eq!((p.sandbox, p.require_landlock), (Sandbox::Fallback, true));
        let p = program(Confinement::TransientUnit);
        assert_eq!(p.sandbox, Sandbox::SystemdRun);
        // Opted out: runs in the fallback without insisting on Landlock.
        let p = program(Confinement::decide(Sandbox::Fallback, -1, true));
        assert_eq!((p.sandbox, p.require_landlock), (Sandbox::Fallback, false));
    }

    #[test]
    fn bad_definitions_are_errors_that_say_what_is_wrong() {
        for (text, needle) in [
            ("program = \"/bin/true\"\ncolour = 1\n", "unknown field"),
            ("program = \"bin/true\"\n", "absolute"),
            ("program = \"/bin/true\"\ntimeout_s = 0\n", "timeout_s"),
            (
                "program = \"/bin/true\"\n[args.n]\ntype = \"integer\"\n",
                "min and max",
            ),
            (
                "program = \"/bin/true\"\n[args.n]\ntype = \"float\"\n",
                "unknown variant",
            ),
            (
                "program = \"/bin/true\"\npositional = [\"x\"]\n",
                "positional",
            ),
            (
                "program = \"/bin/true\"\n[args.N]\ntype = \"bool\"\n",
                "lowercase",
            ),
        ] {
            let err = parse("t", text, Confinement::Landlock).unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
        }
        assert!(
            parse(
                "Bad Name",
                "program = \"/bin/true\"\n",
                Confinement::Landlock
            )
            .is_err()
        );
    }

    #[test]
    fn a_directory_with_bad_files_yields_the_good_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("selftest.toml"), SELFTEST).unwrap();
        std::fs::write(dir.path().join("broken.toml"), "program = [").unwrap();
        std::fs::write(
            dir.path().join("missing.toml"),
            "program = \"/nonexistent/prog\"\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("README"), "not a definition").unwrap();
        let cfg = ActionsConfig::default();
        let found = load_dir(dir.path(), &cfg);
        let names: Vec<String> = found.iter().map(|d| d.spec().name.to_string()).collect();
        assert_eq!(names, ["selftest"]);
        assert!(load_dir(&dir.path().join("none"), &cfg).is_empty());
    }

    /// The fuzz set for action definitions (files the image ships, which a
    /// layer or a hand edit can get wrong): a definition or a reason, and a
    /// checked command becomes one argv word per argument, never more.
    mod fuzz {
        use super::*;
        use crate::fuzz_support::{apply_text, byte_edits};
        use edgebind_protocol::actions::validate_args;
        use proptest::prelude::*;

        fn arg_value() -> impl Strategy<Value = Value> {
            prop_oneof![
                any::<bool>().prop_map(Value::from),
                (0i64..8).prop_map(Value::from),
                prop_oneof![
                    Just("quick".to_owned()),
                    Just("full".to_owned()),
                    "(?s).{0,12}"
                ]
                .prop_map(Value::from),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_text_is_a_definition_or_a_reason(text in "(?s).{0,300}") {
                if let Err(e) = parse("t", &text, Confinement::Landlock) {
                    prop_assert!(!e.trim().is_empty());
                }
            }

            #[test]
            fn a_damaged_definition_is_a_definition_or_a_reason(edits in byte_edits()) {
                match parse("selftest", &apply_text(SELFTEST, &edits), Confinement::Landlock) {
                    Ok(d) => {
                        let spec = d.spec();
                        let text = serde_json::to_string(&spec).unwrap();
                        prop_assert_eq!(serde_json::from_str::<ActionSpec>(&text).unwrap(), spec);
                    }
                    Err(e) => prop_assert!(!e.trim().is_empty()),
                }
            }

            #[test]
            fn checked_arguments_become_one_argv_word_each(
                args in prop::collection::btree_map(
                    prop_oneof![Just("level"), Just("count"), Just("target"), Just("other")],
                    arg_value(),
                    0..4,
                ),
            ) {
                let d = parse("selftest", SELFTEST, Confinement::Landlock).unwrap();
                let args: Map<String, Value> =
                    args.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
                if validate_args(&d.spec().args, &args).is_ok() {
                    let argv = d.argv(&args);
                    let separator = usize::from(args.contains_key("target"));
                    prop_assert_eq!(argv.len(), 1 + args.len() + separator);
                    // A positional value, whatever it spells, comes after `--`.
                    if let Some(Value::String(t)) = args.get("target") {
                        prop_assert_eq!(&argv[argv.len() - 2], "--");
                        prop_assert_eq!(&argv[argv.len() - 1], t);
                    }
                }
            }
        }
    }
}
