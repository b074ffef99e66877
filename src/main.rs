use clap::Parser;
use rfstudio::cli::{self, Cli};

fn main() {
    let cli = Cli::parse();
    let default_level = match cli.global.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(cli::progress::stderr_is_terminal())
        .init();
    if let Err(e) = cli::run(cli) {
        eprintln!("error: {}", cli::render_error(&e.error));
        std::process::exit(e.code);
    }
}
