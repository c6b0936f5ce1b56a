//! `vanguard bench api`: the host daemon under load, through its API. A daemon on a scratch
//! data directory runs the test guest (64 MiB, waiting for the power button) as VMs:
//!
//! 1. latency: `runs` VMs one after another, each created and started, timed from the create
//!    request to the start operation's success (the VMM reports every vCPU running), then
//!    removed; p50 and p99;
//! 2. rate: `concurrent` VMs created and started at once; VMs running per second from the first
//!    request to the last success;
//! 3. the daemon's memory (RSS) with 100 VMs defined (and none running), and idle.
//!
//! Every VM is killed and deleted afterwards, and the daemon stopped.

use api::client::Client;
use api::{Operation, OperationState, Vm};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The daemon under test and its scratch directory, both gone when dropped.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or(0)
}

/// The `p`th percentile (nearest rank) of sorted values.
fn percentile(sorted: &[f64], p: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * (sorted.len() - 1) + 50) / 100;
    sorted[rank.min(sorted.len() - 1)]
}

fn spec(name: &str) -> serde_json::Value {
    serde_json::json!({ "name": name, "memory_mib": 64, "boot": { "cmdline": "console=ttyS0 powerbutton" } })
}

async fn create_and_start(client: &Client, name: &str) -> Result<(), String> {
    let _: Vm = client.post("/v1/vms", &spec(name)).await.map_err(|e| e.to_string())?;
    let op: Operation =
        client.post(&format!("/v1/vms/{name}/start"), &()).await.map_err(|e| e.to_string())?;
    let done: Operation = client
        .get(&format!("/v1/operations/{}/wait?timeout=60", op.id))
        .await
        .map_err(|e| e.to_string())?;
    if done.state != OperationState::Succeeded {
        return Err(format!(
            "starting {name}: {:?} {}",
            done.state,
            done.error.unwrap_or_default()
        ));
    }
    Ok(())
}

async fn remove_all(client: &Client) -> Result<(), String> {
    let vms: Vec<Vm> = client.get("/v1/vms").await.map_err(|e| e.to_string())?;
    let mut stops = Vec::new();
    for vm in vms.iter().filter(|v| v.status.pid.is_some()) {
        let (client, name) = (client.clone(), vm.spec.name.clone());
        stops.push(tokio::spawn(async move {
            let op: Operation =
                client.post(&format!("/v1/vms/{name}/stop?force=true"), &()).await?;
            client.get::<Operation>(&format!("/v1/operations/{}/wait", op.id)).await
        }));
    }
    for stop in stops {
        stop.await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
    }
    for vm in vms {
        client.delete(&format!("/v1/vms/{}", vm.spec.name)).await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Runs the benchmark.
pub fn run(runs: usize, concurrent: usize) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the binary: {e}"))?;
    let dir = std::env::temp_dir().join(format!("vanguard-bench-api-{}", std::process::id()));
    let socket = dir.join("api.sock");
    let child = Command::new(&exe)
        .args(["serve", "--data-dir"])
        .arg(dir.join("data"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the daemon: {e}"))?;
    let daemon = Daemon { child, dir };
    let pid = daemon.child.id();
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            return Err("the daemon did not come up".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let idle = rss_kib(pid);
    let client = Client::unix(&socket);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "api: test guest VMs (64 MiB, 1 vCPU) through vanguard serve's API on a Unix socket, {cpus} host CPUs"
    );
    runtime.block_on(async {
        // 1. Latency, one at a time.
        // Each VM is removed before the next, so that the guests (which poll, spinning a
        // host CPU each) do not pile up on the host.
        let mut latencies = Vec::new();
        for i in 0..runs {
            let t0 = Instant::now();
            create_and_start(&client, &format!("lat-{i}")).await?;
            latencies.push(t0.elapsed().as_secs_f64() * 1e3);
            remove_all(&client).await?;
        }
        latencies.sort_by(f64::total_cmp);
        println!(
            "  create + start -> running, one at a time ({runs} VMs): p50 {:.1} ms, p99 {:.1} ms, min {:.1} ms",
            percentile(&latencies, 50),
            percentile(&latencies, 99),
            latencies.first().copied().unwrap_or(f64::NAN)
        );

        // 2. Rate, all at once.
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..concurrent {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let t = Instant::now();
                create_and_start(&client, &format!("burst-{i}")).await.map(|()| t.elapsed())
            }));
        }
        let mut each = Vec::new();
        for task in tasks {
            each.push(task.await.map_err(|e| e.to_string())??.as_secs_f64() * 1e3);
        }
        let total = t0.elapsed().as_secs_f64();
        each.sort_by(f64::total_cmp);
        println!(
            "  {concurrent} VMs created + started at once: all running after {:.0} ms = {:.0} VMs/s (each: p50 {:.0} ms, p99 {:.0} ms)",
            total * 1e3,
            concurrent as f64 / total,
            percentile(&each, 50),
            percentile(&each, 99)
        );
        remove_all(&client).await?;

        // 3. Memory with 100 defined.
        for i in 0..100 {
            let _: Vm = client.post("/v1/vms", &spec(&format!("def-{i}"))).await.map_err(|e| e.to_string())?;
        }
        println!(
            "  daemon RSS: {:.1} MiB idle, {:.1} MiB with 100 VMs defined",
            idle as f64 / 1024.0,
            rss_kib(pid) as f64 / 1024.0
        );
        remove_all(&client).await
    })?;
    drop(daemon);
    Ok(())
}
