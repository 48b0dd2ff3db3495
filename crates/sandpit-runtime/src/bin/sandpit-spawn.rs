//! `sandpit-spawn`: the single-threaded helper that creates one sandbox.
//! See `sandpit_runtime::spawn` for its protocol.

fn main() {
    std::process::exit(sandpit_runtime::spawn::spawner_main());
}
