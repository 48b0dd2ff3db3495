//! `sandpit-spawn`: the single-threaded helper that creates one sandbox.
//! Its protocol is private to `sandpit_runtime` (the crate's `spawn` module).

fn main() {
    std::process::exit(sandpit_runtime::spawner_main());
}
