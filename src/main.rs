use clap::Parser;
use rfstudio::cli::{self, Cli};

fn main() {
    if cli::needs_runtime_dir(
        std::env::var_os("XDG_RUNTIME_DIR").as_deref(),
        std::env::var_os("WAYLAND_DISPLAY").as_deref(),
        std::env::var_os("DISPLAY").as_deref(),
    ) && let Some(dir) = cli::headless_runtime_dir()
    {
        // SAFETY: the first statement of main, before any thread exists (nothing else reads or
        // writes the environment concurrently).
        unsafe { std::env::set_var("XDG_RUNTIME_DIR", dir) };
    }
    // Messages in the locale's language (English unless it is Chinese); `--lang` decides once
    // the command line is read.
    rfstudio::i18n::set_default(rfstudio::i18n::Lang::from_env());
    let cli = Cli::parse();
    if let Some(lang) = cli.global.lang {
        rfstudio::i18n::set_default(lang);
    }
    // `--json` is for scripts: its fields (notices, statuses, messages) read the same whatever the
    // language, so the whole command speaks English.
    if cli.global.json {
        rfstudio::i18n::set_default(rfstudio::i18n::Lang::En);
    }
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
        eprintln!("{}", rfstudio::tr!("cli.error_prefix", error = cli::render_error(&e.error)));
        std::process::exit(e.code);
    }
}
