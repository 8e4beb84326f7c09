//! `edgebind-agent` with the crash tests' pause points (feature
//! `test-hooks`, see `edgebind_agent::test_hooks`). Tests only.

fn main() {
    std::process::exit(edgebind_agent::cli::main());
}
