//! Blob fetches: each blob the store lacks fetched once however many pulls want it at the same
//! time, into a temp file beside the store's blobs, renamed into place only once its digest
//! checked out (oci-client hashes while streaming and fails on a mismatch) and it was no longer
//! than its descriptor says (a registry streaming forever fails instead of filling the disk).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use oci_client::Reference;
use oci_client::manifest::OciDescriptor;
use tokio::io::AsyncWrite;

use super::super::archive::blob_path;
use super::super::store::Store;

/// A fetch's outcome: bytes fetched (0 when the store had the blob), or containerd's words.
type SharedFetch = Shared<BoxFuture<'static, Result<u64, String>>>;

pub(super) struct Blobs {
    store: Arc<Store>,
    in_flight: Arc<Mutex<HashMap<String, SharedFetch>>>,
}

impl Blobs {
    pub fn new(store: Arc<Store>) -> Blobs {
        Blobs { store, in_flight: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// Makes sure the blob `d` of `image` is stored; returns the bytes fetched for it.
    pub async fn fetch(
        &self,
        client: &oci_client::Client,
        image: &Reference,
        d: &OciDescriptor,
    ) -> Result<u64, String> {
        if self.store.has_blob(&d.digest) {
            return Ok(0);
        }
        let shared = {
            let mut in_flight = self.in_flight.lock().expect("blob lock");
            in_flight
                .entry(d.digest.clone())
                .or_insert_with(|| {
                    let (store, client, image, d) = (self.store.clone(), client.clone(), image.clone(), d.clone());
                    let map = self.in_flight.clone();
                    let task = tokio::spawn(async move {
                        let r = fetch_into_store(&store, &client, &image, &d).await;
                        map.lock().expect("blob lock").remove(&d.digest);
                        r
                    });
                    async move { task.await.unwrap_or_else(|e| Err(format!("the blob fetch failed: {e}"))) }
                        .boxed()
                        .shared()
                })
                .clone()
        };
        shared.await
    }
}

async fn fetch_into_store(
    store: &Store,
    client: &oci_client::Client,
    image: &Reference,
    d: &OciDescriptor,
) -> Result<u64, String> {
    // Another pull may have stored it between the check and this fetch's start.
    if store.has_blob(&d.digest) {
        return Ok(0);
    }
    let size = u64::try_from(d.size).map_err(|_| format!("blob {} has a negative size {}", d.digest, d.size))?;
    let blobs = store.blobs();
    let dir = blobs.join("sha256");
    let io = |what: &str, e: std::io::Error| format!("failed to copy: {what} {}: {e}", dir.display());
    let tmp = tempfile::Builder::new().prefix(".pull-").tempfile_in(&dir).map_err(|e| io("temp file in", e))?;
    let file = tokio::fs::File::from_std(tmp.reopen().map_err(|e| io("reopen temp file in", e))?);
    let mut out = Bounded { inner: file, left: size, digest: d.digest.clone() };
    client.pull_blob(image, d, &mut out).await.map_err(|e| match e {
        oci_client::errors::OciDistributionError::DigestError(de) => {
            // containerd's words for content that is not what its descriptor says.
            format!("failed to copy: {de}: unexpected commit digest for {}: failed precondition", d.digest)
        }
        other => format!("failed to copy: httpReadSeeker: failed open: {}", super::error_chain(&other)),
    })?;
    if out.left != 0 {
        return Err(format!(
            "failed to copy: blob {} is {} bytes, its descriptor says {size}: failed precondition",
            d.digest,
            size - out.left
        ));
    }
    let dest = blob_path(&blobs, &d.digest);
    tmp.persist(&dest).map_err(|e| io("store blob in", e.error))?;
    tracing::debug!(blob.digest = %d.digest, blob.size = size, "blob fetched");
    Ok(size)
}

/// A writer that refuses more bytes than the descriptor's size.
struct Bounded {
    inner: tokio::fs::File,
    left: u64,
    digest: String,
}

impl AsyncWrite for Bounded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        if buf.len() as u64 > self.left {
            let msg = format!("blob {} is longer than its descriptor says", self.digest);
            return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, msg)));
        }
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            this.left -= *n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
