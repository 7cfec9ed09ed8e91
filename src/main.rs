use clap::Parser;
use deepgrow_server::config::Config;

fn main() -> anyhow::Result<()> {
    // Before any thread allocates (see the function).
    deepgrow_server::tune_malloc();
    let config = Config::parse();
    deepgrow_server::init_logging(config.log_format);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(deepgrow_server::run(config))
}
