//! The `gossipfs` command: parse the command line, set up logging, call the
//! library. Everything else lives in the library.

use std::io::IsTerminal;
use std::process::ExitCode;

use log::LevelFilter;
use simplelog::{ColorChoice, ConfigBuilder, TermLogger, TerminalMode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(command) = args.first() else {
        eprintln!("usage: gossipfs demo");
        return ExitCode::from(2);
    };
    match command.as_str() {
        "demo" => {
            init_logging(LevelFilter::Debug);
            match gossipfs::demo::run() {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("error: {err}");
                    ExitCode::from(1)
                }
            }
        }
        _ => {
            eprintln!("usage: gossipfs demo");
            ExitCode::from(2)
        }
    }
}

/// Logs to stderr, colored on a terminal: level, then the node's name (the
/// log target), then the message.
fn init_logging(level: LevelFilter) {
    let config = ConfigBuilder::new()
        .set_target_level(LevelFilter::Error)
        .set_thread_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        .set_time_format_rfc3339()
        .build();
    // termcolor's `Auto` looks only at TERM, so ask whether stderr really
    // is a terminal: no escape codes in log files and pipes.
    let color = if std::io::stderr().is_terminal() {
        ColorChoice::Auto
    } else {
        ColorChoice::Never
    };
    let _ = TermLogger::init(level, config, TerminalMode::Stderr, color);
}
