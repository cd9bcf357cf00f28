//! The S3 calls the sink makes, with errors mapped to [`SinkError`] (transient vs permanent).
use aws_sdk_s3::Client;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::aws::{classify, encode_key, is_not_found};
use crate::runtime::Health;
use crate::runtime::sink_api::SinkError;

/// Concurrent requests per batch operation (uploads, copies): bounds sockets and memory in flight.
pub const CONCURRENCY: usize = 16;

#[derive(Clone)]
pub struct Store {
    pub client: Client,
    pub bucket: String,
    pub health: Health,
}

fn to_sink<E, R>(health: &Health, what: &str, e: &aws_sdk_s3::error::SdkError<E, R>) -> SinkError
where
    E: aws_sdk_s3::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let c = classify(what, e);
    if matches!(e, aws_sdk_s3::error::SdkError::DispatchFailure(_) | aws_sdk_s3::error::SdkError::TimeoutError(_)) {
        health.set_external(false);
    }
    if c.permanent { SinkError::Permanent(c.message) } else { SinkError::Transient(c.message) }
}

impl Store {
    pub async fn put(&self, key: &str, body: Bytes) -> Result<(), SinkError> {
        let r = self.client.put_object().bucket(&self.bucket).key(key).body(ByteStream::from(body)).send().await;
        match r {
            Ok(_) => {
                self.health.set_external(true);
                Ok(())
            }
            Err(e) => Err(to_sink(&self.health, &format!("PutObject s3://{}/{key}", self.bucket), &e)),
        }
    }

    /// PutObject with a few quick retries of transient failures: staging has no retry of its own in the runtime
    /// (a failed stage poisons the round), so ride out short blips here.
    pub async fn put_retrying(&self, key: &str, body: Bytes) -> Result<(), SinkError> {
        let mut delay = std::time::Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            match self.put(key, body.clone()).await {
                Err(SinkError::Transient(m)) if attempt < 4 => {
                    tracing::info!(key, attempt, error = %m, "retrying upload");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// The object's bytes, or `None` when it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, SinkError> {
        match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => {
                self.health.set_external(true);
                let body = out.body.collect().await.map_err(|e| {
                    SinkError::Transient(format!("GetObject s3://{}/{key}: reading the body: {e}", self.bucket))
                })?;
                Ok(Some(body.into_bytes()))
            }
            Err(e) => {
                let c = classify("GetObject", &e);
                if matches!(c.code.as_deref(), Some("NoSuchKey" | "NotFound")) {
                    self.health.set_external(true);
                    return Ok(None);
                }
                Err(to_sink(&self.health, &format!("GetObject s3://{}/{key}", self.bucket), &e))
            }
        }
    }

    pub async fn copy(&self, from: &str, to: &str) -> Result<(), SinkError> {
        let source = format!("{}/{}", self.bucket, encode_key(from));
        match self.client.copy_object().bucket(&self.bucket).key(to).copy_source(source).send().await {
            Ok(_) => Ok(()),
            Err(e) => Err(to_sink(&self.health, &format!("CopyObject s3://{}/{from} -> {to}", self.bucket), &e)),
        }
    }

    /// Builds `to` from staged `parts` in order: a plain copy for one part, a multipart upload of part copies
    /// otherwise (every part but the last is at least 5 MiB, as S3 requires).
    pub async fn assemble(&self, parts: &[String], to: &str) -> Result<(), SinkError> {
        match parts {
            [] => Ok(()),
            [one] => self.copy(one, to).await,
            _ => {
                let what = format!("multipart copy to s3://{}/{to}", self.bucket);
                let up = self
                    .client
                    .create_multipart_upload()
                    .bucket(&self.bucket)
                    .key(to)
                    .send()
                    .await
                    .map_err(|e| to_sink(&self.health, &what, &e))?;
                let Some(upload_id) = up.upload_id().map(str::to_string) else {
                    return Err(SinkError::Transient(format!("{what}: no upload id in the answer")));
                };
                let result = self.copy_parts(parts, to, &upload_id, &what).await;
                if result.is_err() {
                    // Best effort: an abandoned upload only costs storage until a lifecycle rule removes it.
                    let _ = self
                        .client
                        .abort_multipart_upload()
                        .bucket(&self.bucket)
                        .key(to)
                        .upload_id(&upload_id)
                        .send()
                        .await;
                }
                result
            }
        }
    }

    async fn copy_parts(&self, parts: &[String], to: &str, upload_id: &str, what: &str) -> Result<(), SinkError> {
        let jobs: Vec<(Store, i32, String, String, String, String)> = parts
            .iter()
            .enumerate()
            .map(|(i, part)| {
                (self.clone(), i as i32 + 1, part.clone(), to.to_string(), upload_id.to_string(), what.to_string())
            })
            .collect();
        let copied: Vec<CompletedPart> = futures::stream::iter(jobs)
            .map(|(store, n, part, to, upload_id, what)| async move {
                let r = store
                    .client
                    .upload_part_copy()
                    .bucket(&store.bucket)
                    .key(&to)
                    .upload_id(&upload_id)
                    .part_number(n)
                    .copy_source(format!("{}/{}", store.bucket, encode_key(&part)))
                    .send()
                    .await
                    .map_err(|e| to_sink(&store.health, &what, &e))?;
                let etag = r.copy_part_result().and_then(|c| c.e_tag()).map(str::to_string);
                Ok::<_, SinkError>(CompletedPart::builder().part_number(n).set_e_tag(etag).build())
            })
            .buffered(CONCURRENCY)
            .try_collect()
            .await?;
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(to)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(copied)).build())
            .send()
            .await
            .map_err(|e| to_sink(&self.health, what, &e))?;
        Ok(())
    }

    /// Keys under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>, SinkError> {
        let mut pages = self.client.list_objects_v2().bucket(&self.bucket).prefix(prefix).into_paginator().send();
        let mut keys = Vec::new();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| to_sink(&self.health, &format!("ListObjectsV2 s3://{}/{prefix}", self.bucket), &e))?;
            keys.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_string)));
        }
        Ok(keys)
    }

    /// Deletes `keys` (missing ones are fine), 1000 per request.
    pub async fn delete(&self, keys: &[String]) -> Result<(), SinkError> {
        for chunk in keys.chunks(1000) {
            let ids = chunk
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| SinkError::Permanent(format!("DeleteObjects: {e}")))?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| SinkError::Permanent(format!("DeleteObjects: {e}")))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| to_sink(&self.health, &format!("DeleteObjects s3://{}", self.bucket), &e))?;
            if let Some(err) = out.errors().first() {
                return Err(SinkError::Transient(format!(
                    "DeleteObjects s3://{}/{}: {} {}",
                    self.bucket,
                    err.key().unwrap_or(""),
                    err.code().unwrap_or(""),
                    err.message().unwrap_or("")
                )));
            }
        }
        Ok(())
    }

    /// Deletes everything under `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), SinkError> {
        let keys = self.list(prefix).await?;
        self.delete(&keys).await
    }

    /// True when S3 says the bucket does not exist.
    pub async fn bucket_missing(&self) -> bool {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => false,
            Err(e) => is_not_found(classify("HeadBucket", &e).code.as_deref()),
        }
    }

    /// Checks that the bucket answers (for readiness at start-up); the error text when it does not.
    pub async fn probe(&self) -> Result<(), String> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let c = classify(&format!("HeadBucket {}", self.bucket), &e);
                if is_not_found(c.code.as_deref()) {
                    Err(format!("bucket {:?} does not exist", self.bucket))
                } else {
                    Err(c.message)
                }
            }
        }
    }
}
