//! `oclocks cluster`: the cluster's members and their removal.
//!
//! `members` prints what STATUS reports of every member (id, client
//! address, site, role, replication lag as the leader sees it); `remove`
//! sends REMOVE_SERVER (administrators only), which the leader refuses when
//! the remaining voters could not form a quorum; `promote` sends
//! PROMOTE_SERVER (administrators only), the approval of a new voter. Exit status 0 on success,
//! 1 with a one-line message otherwise.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use oclocks_proto::Role;

use crate::client_cmds::ClientArgs;

#[derive(Subcommand)]
pub enum ClusterCmd {
    /// List the cluster's members with their roles.
    Members(MembersArgs),
    /// Remove a server from the cluster (administrators).
    Remove(RemoveArgs),
    /// Make a learner a voter: approve a node that joined without being
    /// listed in the servers' `voters` or `peers` (administrators).
    Promote(RemoveArgs),
}

#[derive(Args)]
pub struct MembersArgs {
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Args)]
pub struct RemoveArgs {
    /// The node id.
    node: u64,
    #[command(flatten)]
    client: ClientArgs,
}

fn role_name(r: Option<Role>) -> &'static str {
    match r {
        Some(Role::Leader) => "leader",
        Some(Role::Follower) => "voter",
        Some(Role::Candidate) => "candidate",
        Some(Role::Learner) => "learner",
        Some(Role::QuorumOnly) => "quorum-only",
        None => "?",
    }
}

pub async fn run(cmd: ClusterCmd) -> Result<ExitCode> {
    match cmd {
        ClusterCmd::Members(a) => {
            let client = a.client.connect(None).await?;
            let s = client.status().await?;
            client.close().await.ok();
            println!(
                "{:>5}  {:<24} {:<12} {:<12} {:>6}",
                "NODE", "ADDRESS", "SITE", "ROLE", "LAG"
            );
            for srv in &s.servers {
                println!(
                    "{:>5}  {:<24} {:<12} {:<12} {:>6}",
                    srv.node_id,
                    srv.address,
                    srv.site,
                    role_name(srv.role),
                    srv.lag.map_or("-".to_string(), |l| l.to_string())
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ClusterCmd::Remove(a) => {
            let client = a.client.connect(None).await?;
            let r = client.remove_server(a.node).await;
            client.close().await.ok();
            r?;
            println!("node {} removed", a.node);
            Ok(ExitCode::SUCCESS)
        }
        ClusterCmd::Promote(a) => {
            let client = a.client.connect(None).await?;
            let r = client.promote_server(a.node).await;
            client.close().await.ok();
            r?;
            println!("node {} is a voter", a.node);
            Ok(ExitCode::SUCCESS)
        }
    }
}
