//! Shared by the S3 and Kinesis tests: the moto server started by `tests/services/moto.sh` on 127.0.0.1:5000.
#![allow(dead_code)]
use std::sync::Once;

use wallaroo_connector::aws::{AwsSettings, sdk_config};
use wallaroo_crds::SecretValue;

pub const ENDPOINT: &str = "http://127.0.0.1:5000";
pub const REGION: &str = "us-east-1";
pub const KEY_VAR: &str = "WALLAROO_TEST_AWS_KEY_ID";
pub const SECRET_VAR: &str = "WALLAROO_TEST_AWS_SECRET";

static ENV: Once = Once::new();

/// Secret references for the static credentials moto accepts (any value does).
pub fn creds() -> (Option<SecretValue>, Option<SecretValue>) {
    ENV.call_once(|| {
        // SAFETY: set once, before any test reads these variables (every reader goes through this function).
        unsafe {
            std::env::set_var(KEY_VAR, "testing");
            std::env::set_var(SECRET_VAR, "testing");
        }
    });
    (Some(SecretValue::from_env(KEY_VAR)), Some(SecretValue::from_env(SECRET_VAR)))
}

/// Fails loudly when moto is not running: tests must not pass by skipping.
pub async fn require_moto() {
    if tokio::net::TcpStream::connect("127.0.0.1:5000").await.is_err() {
        panic!("moto is not answering on 127.0.0.1:5000: run tests/services/moto.sh first");
    }
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand::random::<u32>())
}

pub async fn shared_config() -> aws_config::SdkConfig {
    require_moto().await;
    let (id, secret) = creds();
    sdk_config(&AwsSettings {
        base: "test",
        region: REGION,
        endpoint: Some(ENDPOINT),
        access_key_id_from: &id,
        secret_access_key_from: &secret,
    })
    .await
    .unwrap()
}

pub async fn s3() -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::from(&shared_config().await).force_path_style(true).build();
    aws_sdk_s3::Client::from_conf(conf)
}

pub async fn kinesis() -> aws_sdk_kinesis::Client {
    aws_sdk_kinesis::Client::new(&shared_config().await)
}

/// Creates a stream and waits until it is ACTIVE.
pub async fn create_stream(k: &aws_sdk_kinesis::Client, name: &str, shards: i32) {
    k.create_stream().stream_name(name).shard_count(shards).send().await.unwrap();
    for _ in 0..100 {
        let d = k.describe_stream_summary().stream_name(name).send().await.unwrap();
        if d.stream_description_summary().map(|s| s.stream_status().as_str() == "ACTIVE").unwrap_or(false) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("stream {name} did not become ACTIVE");
}

/// Every record of every shard of `stream`, per shard, from TRIM_HORIZON: (shard, partition key, data).
pub async fn read_all(k: &aws_sdk_kinesis::Client, stream: &str) -> Vec<(String, String, Vec<u8>)> {
    let shards = k.list_shards().stream_name(stream).send().await.unwrap().shards.unwrap_or_default();
    let mut out = Vec::new();
    for s in shards {
        let mut it = k
            .get_shard_iterator()
            .stream_name(stream)
            .shard_id(&s.shard_id)
            .shard_iterator_type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator;
        while let Some(i) = it {
            let r = k.get_records().shard_iterator(i).send().await.unwrap();
            if r.records.is_empty() {
                break;
            }
            for rec in r.records {
                out.push((s.shard_id.clone(), rec.partition_key.unwrap_or_default(), rec.data.into_inner()));
            }
            it = r.next_shard_iterator;
        }
    }
    out
}

/// The connector binary as a child process, so a test can `kill -9` it.
pub struct Sidecar {
    child: std::process::Child,
}

impl Sidecar {
    /// Starts `wallaroo-connector run -f <manifest>` with the test credentials in its environment.
    pub fn start(dir: &std::path::Path, manifest: &str) -> Self {
        let path = dir.join(format!("manifest-{:08x}.yaml", rand::random::<u32>()));
        std::fs::write(&path, manifest).unwrap();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("sidecar.log")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_wallaroo-connector"))
            .args(["run", "-f"])
            .arg(&path)
            .args(["--admin-addr", "127.0.0.1:0"])
            .env(KEY_VAR, "testing")
            .env(SECRET_VAR, "testing")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Self { child }
    }

    /// SIGKILL: no drain, no clean-up, nothing flushed.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        // SAFETY: signalling our own child by its pid.
        unsafe {
            libc_kill(self.child.id() as i32, 15);
        }
        let status = self.child.wait().unwrap();
        assert!(status.success(), "sidecar exited with {status}");
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}
