//! The `fogmesh` binary: everything lives in `fogmesh-node`'s CLI.

fn main() -> std::process::ExitCode {
    fogmesh_node::cli::main()
}
