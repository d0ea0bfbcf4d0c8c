//! A real S3 implementation on loopback for the cache tests: moto's server (PyPI `moto[server]`,
//! pinned in `.ci/run`), with request signing checked (`INITIAL_NO_AUTH_ACTION_COUNT`: the
//! first three calls make an IAM user and its key without credentials, every later call must be
//! signed with that key, so wrong credentials are refused as S3 refuses them). boto3 is the
//! independent client that sets the bucket up and counts what landed in it.

use std::process::{Command, Stdio};
use std::time::Duration;

pub const BUCKET: &str = "keel-cache";

pub struct Moto {
    pub port: u16,
    pub access_key: String,
    pub secret_key: String,
    child: std::process::Child,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

const SETUP: &str = r#"
import boto3, json, sys
ep = sys.argv[1]
kw = dict(endpoint_url=ep, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup")
iam = boto3.client("iam", **kw)
iam.create_user(UserName="ci")
key = iam.create_access_key(UserName="ci")["AccessKey"]
iam.put_user_policy(UserName="ci", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
s3 = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                  aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
s3.create_bucket(Bucket=sys.argv[2])
print(json.dumps([key["AccessKeyId"], key["SecretAccessKey"]]))
"#;

const LIST: &str = r#"
import boto3, json, sys
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id=sys.argv[3], aws_secret_access_key=sys.argv[4])
out = {}
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[2]):
    for o in page.get("Contents", []):
        out[o["Key"]] = o["Size"]
print(json.dumps(out))
"#;

impl Moto {
    pub async fn start() -> Moto {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (pip install 'moto[server]'; see .ci/run)");
        let give_up = std::time::Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < give_up, "moto_server did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut moto = Moto { port, access_key: String::new(), secret_key: String::new(), child };
        let out = Command::new("python3").args(["-c", SETUP, &moto.endpoint(), BUCKET]).output().expect("python3");
        assert!(out.status.success(), "moto setup: {}", String::from_utf8_lossy(&out.stderr));
        let keys: Vec<String> = serde_json::from_slice(&out.stdout).expect("keys");
        moto.access_key = keys[0].clone();
        moto.secret_key = keys[1].clone();
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every object in the bucket and its size, read with boto3.
    pub fn objects(&self) -> std::collections::BTreeMap<String, u64> {
        let out = Command::new("python3")
            .args(["-c", LIST, &self.endpoint(), BUCKET, &self.access_key, &self.secret_key])
            .output()
            .expect("python3");
        assert!(out.status.success(), "listing the bucket: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("a JSON map")
    }

    /// `[runners.cache]` for this server, with `secret` as the SecretKey.
    pub fn config(&self, secret: &str) -> String {
        format!(
            "[runners.cache]\nType = \"s3\"\nPath = \"ci\"\n[runners.cache.s3]\nServerAddress = \"127.0.0.1:{}\"\n\
             AccessKey = \"{}\"\nSecretKey = \"{secret}\"\nBucketName = \"{BUCKET}\"\nBucketLocation = \"us-east-1\"\n\
             Insecure = true\n",
            self.port, self.access_key
        )
    }
}
