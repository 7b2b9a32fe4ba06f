//! Hold a lock until ctrl-c or until it is lost, printing what happens.
//! A manual check against a running cluster:
//!
//! ```text
//! cargo run -p oclocks-client --example hold -- .oclocks-dev/client.toml demo 5s
//! ```
//!
//! Arguments: the client config file, the lock name (zone `default`), and
//! the wait bound (default: forever).

use oclocks_client::{parse_duration, Client, ClientConfig, Error};

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let (Some(config), Some(name)) = (args.next(), args.next()) else {
        return Err(Error::Config("usage: hold CONFIG.toml NAME [WAIT]".into()));
    };
    let wait = args
        .next()
        .map(|w| parse_duration(&w).map_err(Error::Config))
        .transpose()?;
    let client = Client::connect(ClientConfig::from_file(config)?).await?;
    let s = client.session();
    println!(
        "connected to {} (node {}, site {}), client id {:032x}, cluster {:032x}",
        s.endpoint.unwrap_or_default(),
        s.node_id.unwrap_or_default(),
        s.site.unwrap_or_default(),
        client.client_id(),
        client.cluster_id()
    );
    let builder = client.lock("default", &name);
    let builder = match wait {
        Some(w) => builder.wait(w),
        None => builder.wait_forever(),
    };
    let guard = builder.acquire().await?;
    println!(
        "holding {name} with token {}; ctrl-c to release",
        guard.token()
    );
    tokio::select! {
        reason = guard.lost() => println!("lost: {reason}"),
        _ = tokio::signal::ctrl_c() => {
            let outcome = guard.release().await?;
            println!("released (already released: {})", outcome.already_released);
        }
    }
    client.close().await?;
    Ok(())
}
