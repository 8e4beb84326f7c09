# edgebind_action: a recipe that installs one Edgebind device action.
#
# The recipe installs the action's program (anywhere under ${D}, usually
# ${libexecdir}/edgebind-actions/) and ships its definition, a TOML file in
# SRC_URI (see agent/src/actions/declared.rs for the format); this class
# installs the definition as ${sysconfdir}/edgebind/actions.d/NAME.toml, where
# the agent reads it, and fails the build when the definition would be
# skipped by the agent (unknown key, bad name, relative program path, bad
# argument types) or names a program this recipe does not install.
#
#   inherit edgebind_action
#   EDGEBIND_ACTION_NAME = "selftest"            # default: ${BPN} without "edgebind-action-"
#   EDGEBIND_ACTION_DEFINITION = "selftest.toml" # default: NAME.toml, from SRC_URI

EDGEBIND_ACTION_NAME ??= "${@d.getVar('BPN').replace('edgebind-action-', '', 1)}"
EDGEBIND_ACTION_DEFINITION ??= "${EDGEBIND_ACTION_NAME}.toml"
EDGEBIND_ACTIONS_DIR = "${sysconfdir}/edgebind/actions.d"

FILES:${PN} += "${EDGEBIND_ACTIONS_DIR}/${EDGEBIND_ACTION_NAME}.toml"
RDEPENDS:${PN} += "edgebind-agent"

do_install:append() {
    install -d ${D}${EDGEBIND_ACTIONS_DIR}
    install -m 0644 ${UNPACKDIR}/${EDGEBIND_ACTION_DEFINITION} ${D}${EDGEBIND_ACTIONS_DIR}/${EDGEBIND_ACTION_NAME}.toml
}

python edgebind_action_check() {
    import os
    import re
    try:
        import tomllib
    except ImportError:
        bb.fatal('edgebind-action: checking %s needs Python 3.11 (tomllib) on the build host' % d.getVar('PN'))

    name = d.getVar('EDGEBIND_ACTION_NAME')
    dest = d.getVar('D')
    path = dest + d.getVar('EDGEBIND_ACTIONS_DIR') + '/' + name + '.toml'
    where = '%s: action definition %s' % (d.getVar('PN'), d.getVar('EDGEBIND_ACTION_DEFINITION'))
    # The agent's rules (agent/src/actions/declared.rs, protocol/src/actions.rs).
    name_rule = re.compile(r'^[a-z][a-z0-9_-]{0,63}$')
    if not name_rule.match(name):
        bb.fatal('%s: action name %r: lowercase letters, digits, "-" and "_", starting with a letter, at most 64' % (where, name))
    try:
        with open(path, 'rb') as f:
            spec = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        bb.fatal('%s does not parse: %s' % (where, e))

    top = {'description', 'program', 'timeout_s', 'user', 'output_limit_bytes', 'idempotent',
           'writable_paths', 'positional', 'args'}
    unknown = sorted(set(spec) - top)
    if unknown:
        bb.fatal('%s: unknown keys %s (the agent would skip the file)' % (where, ', '.join(unknown)))
    program = spec.get('program')
    if not isinstance(program, str) or not program.startswith('/'):
        bb.fatal('%s: program must be an absolute path, not %r' % (where, program))
    installed = dest + program
    if not os.path.isfile(installed) or not os.access(installed, os.X_OK):
        bb.fatal('%s: program %s is not installed (executable) by this recipe' % (where, program))
    timeout = spec.get('timeout_s', 60)
    if not isinstance(timeout, int) or not 1 <= timeout <= 86400:
        bb.fatal('%s: timeout_s must be 1..86400' % where)
    if spec.get('output_limit_bytes', 0) > 65536:
        bb.fatal('%s: output_limit_bytes is above 65536' % where)
    for p in spec.get('writable_paths', []):
        if not isinstance(p, str) or not p.startswith('/'):
            bb.fatal('%s: writable_paths entry %r is not absolute' % (where, p))
    args = spec.get('args', {})
    arg_keys = {'type', 'allowed', 'max_len', 'min', 'max', 'required', 'description'}
    for arg, a in args.items():
        if not name_rule.match(arg):
            bb.fatal('%s: argument name %r is not allowed' % (where, arg))
        unknown = sorted(set(a) - arg_keys)
        if unknown:
            bb.fatal('%s: args.%s: unknown keys %s' % (where, arg, ', '.join(unknown)))
        kind = a.get('type')
        if kind not in ('string', 'integer', 'bool'):
            bb.fatal('%s: args.%s: type must be string, integer or bool' % (where, arg))
        if kind == 'integer' and not (isinstance(a.get('min'), int) and isinstance(a.get('max'), int) and a['min'] <= a['max']):
            bb.fatal('%s: args.%s: an integer needs min <= max' % (where, arg))
        if kind != 'string' and ('allowed' in a or 'max_len' in a):
            bb.fatal('%s: args.%s: allowed and max_len are for strings' % (where, arg))
        if kind != 'integer' and ('min' in a or 'max' in a):
            bb.fatal('%s: args.%s: min and max are for integers' % (where, arg))
    for p in spec.get('positional', []):
        if p not in args:
            bb.fatal('%s: positional %r is not a declared argument' % (where, p))
}
edgebind_action_check[doc] = "Fail the build when the action definition would be skipped by the agent or names a program the recipe does not install"
do_install[postfuncs] += "edgebind_action_check"
