//! `edgebind-agent`: see `edgebind_agent::cli` for options and exit codes.

fn main() {
    std::process::exit(edgebind_agent::cli::main());
}
