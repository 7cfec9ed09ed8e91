use clap::Parser;
use deepgrow_server::config::Config;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    deepgrow_server::init_logging(config.log_format);
    deepgrow_server::run(config).await
}
