//! The `meridian` binary: parse flags, load configuration, start telemetry, run the node.

use std::collections::HashMap;

use clap::Parser;
use meridian::cli::{
    Cli, Command, run_cluster, run_demo, run_dev, run_monitor, run_routing, shutdown_on_signal,
};
use meridian::config::Config;
use meridian::observability::init_tracing;
use meridian::server;

// glibc's allocator cost ~14% of the CPU under telemetry load (objects are freed on other
// threads than the one that allocated them); see docs/adr/012.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match cli.command {
        Command::MonitorEvents(args) => {
            return tokio::runtime::Runtime::new()?.block_on(run_monitor(args));
        }
        Command::Routing(args) => {
            return tokio::runtime::Runtime::new()?.block_on(run_routing(args));
        }
        Command::Cluster(args) => {
            return tokio::runtime::Runtime::new()?.block_on(run_cluster(args));
        }
        Command::Demo(args) => {
            let runtime = server::runtime()?;
            return runtime.block_on(async move {
                let config = Config::load(None, &env)?;
                let _telemetry = init_tracing(&config.observability)?;
                run_demo(args, &env).await
            });
        }
        Command::Dev(ref args) => args.config(&env)?,
        Command::Node(ref args) | Command::CheckConfig(ref args) => args.config(&env)?,
    };
    if let Command::CheckConfig(_) = cli.command {
        println!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    // A panic anywhere leaves a half-alive node; abort the process instead so supervisors restart it.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
    let runtime = server::runtime()?;
    runtime.block_on(async move {
        let _telemetry = init_tracing(&config.observability)?;
        match cli.command {
            Command::Dev(_) => run_dev(config).await,
            _ => Ok(server::run(config, shutdown_on_signal()).await?),
        }
    })
}
