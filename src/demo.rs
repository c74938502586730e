//! `easemob-gateway demo`: the simulator on a free loopback port, the gateway in front of it on the usual ports,
//! and a few curl lines that work against it as printed.

use std::net::SocketAddr;

use crate::config::{Config, SecretPolicy};
use crate::server::{Server, shutdown_signal};
use crate::sim::{Simulator, state};

pub async fn run(listen: SocketAddr, admin_listen: SocketAddr) -> Result<(), String> {
    let (sim_addr, sim) = Simulator::demo()
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)), None)
        .await
        .map_err(|e| format!("simulator: {e}"))?;
    tokio::spawn(sim);
    // Every default, the simulator as Easemob, and the demo app with its inline secret (allowed in demo only).
    let mut config: Config = toml::from_str(&format!(
        "[upstream]\nbase_url = \"http://{sim_addr}\"\n\n[[apps]]\norg_name = \"{}\"\napp_name = \"{}\"\n\
         client_id = \"{}\"\nclient_secret = \"{}\"\n",
        state::DEMO_ORG,
        state::DEMO_APP,
        state::DEMO_CLIENT_ID,
        state::DEMO_CLIENT_SECRET
    ))
    .map_err(|e| format!("demo config: {e}"))?;
    config.server.listen = listen;
    config.server.admin_listen = admin_listen;
    // Deletion jobs on, with a store that lives as long as the demo.
    let store = std::env::temp_dir().join(format!("easemob-gateway-demo-{}", std::process::id()));
    std::fs::create_dir_all(&store).map_err(|e| format!("{}: {e}", store.display()))?;
    config.jobs.enabled = true;
    config.jobs.store = Some(store.join("jobs.db"));
    let server = Server::bind(config, SecretPolicy::InlineAllowed).await.map_err(|e| e.to_string())?;
    let (data, admin) = (server.data_addr(), server.admin_addr());
    let base = format!("http://{data}/{}/{}", state::DEMO_ORG, state::DEMO_APP);
    let view = format!("http://{sim_addr}/_sim/apps/{}/{}/users", state::DEMO_ORG, state::DEMO_APP);
    println!(
        r#"easemob-gateway demo: the gateway on http://{data} (admin http://{admin}) in front of a simulated Easemob
on http://{sim_addr}, seeded with users alice, bob, carol, dave and group {group}. No credential needed.

# what alice sees before (the simulator's inspection API):
curl -s -w '\n' {view}/alice

# delete two of alice's messages with bob; bob keeps them:
curl -s -w '\n' -X DELETE '{base}/rest/message/roaming/chat/user/alice?userId=bob&msgIdList=1100000000000000001,1100000000000000003&isNotify=false'

# alice forgets her conversation with carol, roaming messages included:
curl -s -w '\n' -X DELETE '{base}/users/alice/user_channel' -H 'Content-Type: application/json' -d '{{"channel":"carol","type":"chat","delete_roam":true}}'

# a mistake the gateway catches before Easemob sees it (delTime in seconds):
curl -s -w '\n' -X DELETE '{base}/rest/message/roaming/group/user/bob/time?groupId={group}&delTime=1659014868'

# and after: alice's view, bob's view, readiness and metrics
curl -s -w '\n' {view}/alice; curl -s -w '\n' {view}/bob
curl -s -w '\n' http://{admin}/readyz; curl -s -w '\n' http://{admin}/metrics | grep easemob_gateway_requests_total

# spam cleanup: one job removes {spammer}'s message {spam} from every recipient, at the quota's pace:
curl -s -w '\n' -X POST '{base}/_gateway/jobs' -H 'Content-Type: application/json' -d '{{"operations":[{ops}]}}'

# the app's jobs (each with its location, counts and state), then what dave sees now:
curl -s -w '\n' '{base}/_gateway/jobs'; curl -s -w '\n' {view}/dave

Ctrl-C stops the demo."#,
        group = state::DEMO_GROUP,
        spammer = state::DEMO_SPAMMER,
        spam = state::DEMO_SPAM,
        ops = ["alice", "bob", "carol", "dave"]
            .map(|to| format!(
                r#"{{"method":"DELETE","path":"/rest/message/roaming/chat/user/{to}?userId={}&msgIdList={}"}}"#,
                state::DEMO_SPAMMER,
                state::DEMO_SPAM
            ))
            .join(","),
    );
    server.serve(shutdown_signal()).await;
    let _ = std::fs::remove_dir_all(&store);
    Ok(())
}
