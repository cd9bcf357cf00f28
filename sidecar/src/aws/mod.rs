//! What the AWS integrations (S3 sink, Kinesis source and sink) share: building an SDK configuration from a
//! spec (region, endpoint override, static credentials from Secret references or the default chain) and telling
//! retryable errors from permanent ones.
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use wallaroo_crds::SecretValue;

/// Connection settings common to every AWS integration.
#[derive(Debug, Clone)]
pub struct AwsSettings<'a> {
    /// Field path of the spec, for error messages (e.g. `spec.sink.s3`).
    pub base: &'a str,
    pub region: &'a str,
    pub endpoint: Option<&'a str>,
    pub access_key_id_from: &'a Option<SecretValue>,
    pub secret_access_key_from: &'a Option<SecretValue>,
}

/// Loads the shared SDK configuration. Static credentials when both secret references are given, else the
/// default provider chain (environment, web identity / IRSA, ECS, instance metadata, profile).
pub async fn sdk_config(s: &AwsSettings<'_>) -> Result<aws_config::SdkConfig, String> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(s.region.to_string()))
        // Bounded attempts: a call that hangs must not hold a 2PC round or a shard reader forever.
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(Duration::from_secs(30))
                .build(),
        );
    if let Some(ep) = s.endpoint {
        loader = loader.endpoint_url(ep);
    }
    match (s.access_key_id_from, s.secret_access_key_from) {
        (Some(id), Some(secret)) => {
            let id = id.resolve(&format!("{}.accessKeyIdFrom", s.base)).map_err(|e| e.to_string())?;
            let secret = secret.resolve(&format!("{}.secretAccessKeyFrom", s.base)).map_err(|e| e.to_string())?;
            loader = loader.credentials_provider(Credentials::new(id, secret, None, None, "wallaroo-secret"));
        }
        (None, None) => {}
        _ => {
            return Err(format!(
                "{}: set both accessKeyIdFrom and secretAccessKeyFrom, or neither (default credential chain)",
                s.base
            ));
        }
    }
    Ok(loader.load().await)
}

/// Error codes after which retrying the same request cannot succeed.
const PERMANENT_CODES: &[&str] = &[
    "NoSuchBucket",
    "AccessDenied",
    "AllAccessDisabled",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidBucketName",
    "AccountProblem",
    "InvalidArgument",
    "InvalidRequest",
    "EntityTooLarge",
    "KeyTooLongError",
    "NoSuchKey",
    "NotFound",
    "ResourceNotFoundException",
    "AccessDeniedException",
    "UnrecognizedClientException",
    "InvalidArgumentException",
    "ValidationException",
    "KMSAccessDeniedException",
    "KMSDisabledException",
    "KMSNotFoundException",
    "KMSInvalidStateException",
];

/// How an SDK error should be treated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub permanent: bool,
    pub code: Option<String>,
    pub message: String,
}

/// Classifies an SDK error: service errors with a code in [`PERMANENT_CODES`] are permanent, everything else
/// (timeouts, connection failures, throttling, 5xx) is worth retrying.
pub fn classify<E, R>(what: &str, e: &SdkError<E, R>) -> Classified
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let code = e.code().map(str::to_string);
    let permanent =
        matches!(e, SdkError::ServiceError(_)) && code.as_deref().is_some_and(|c| PERMANENT_CODES.contains(&c));
    Classified { permanent, code, message: format!("{what}: {}", DisplayErrorContext(e)) }
}

/// True when `code` says the thing addressed does not exist (S3 returns bare 404s as `NotFound`).
pub fn is_not_found(code: Option<&str>) -> bool {
    matches!(code, Some("NoSuchKey" | "NotFound" | "NoSuchBucket" | "ResourceNotFoundException"))
}

/// RFC 3986 percent-encoding of an object key for `x-amz-copy-source` (slashes kept).
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_source_keys_are_percent_encoded() {
        assert_eq!(encode_key("a/b c+d:é"), "a/b%20c%2Bd%3A%C3%A9");
        assert_eq!(encode_key("plain-key_1.txt"), "plain-key_1.txt");
    }

    #[tokio::test]
    async fn half_a_credential_pair_is_refused() {
        let id = Some(SecretValue::from_env("AWS_TEST_ONLY_ID"));
        let s = AwsSettings {
            base: "spec.sink.s3",
            region: "us-east-1",
            endpoint: None,
            access_key_id_from: &id,
            secret_access_key_from: &None,
        };
        let e = sdk_config(&s).await.unwrap_err();
        assert!(e.contains("both accessKeyIdFrom and secretAccessKeyFrom"), "{e}");
    }
}
