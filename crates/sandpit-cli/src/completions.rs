//! `sandpit completions bash|zsh|fish`: the shell's completion script,
//! generated from the command definitions (so it never drifts from them).

use clap::{Args, CommandFactory};
use clap_complete::Shell;

#[derive(Args, Debug)]
pub(crate) struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_parser = ["bash", "zsh", "fish"])]
    shell: String,
}

/// Writes the script to stdout.
pub(crate) fn run(args: CompletionsArgs) {
    let shell = match args.shell.as_str() {
        "zsh" => Shell::Zsh,
        "fish" => Shell::Fish,
        _ => Shell::Bash,
    };
    let mut command = crate::Cli::command();
    clap_complete::generate(shell, &mut command, "sandpit", &mut std::io::stdout());
}
