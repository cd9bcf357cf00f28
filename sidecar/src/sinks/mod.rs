//! Sink integrations, one folder per kind. Each implements [`SinkIntegration`]; [`build`] picks one from the
//! manifest and connects it.
use std::sync::Arc;

use wallaroo_crds::SinkSpec;

use crate::runtime::sink_api::{SinkError, SinkIntegration};
use crate::runtime::{Health, Metrics};

pub mod file;
pub mod kafka;
pub mod kinesis;
pub mod payload;
pub mod postgres;
pub mod redis_hash;
pub mod s3;
pub mod udp;

/// Builds (and connects) the integration for the (validated) sink spec.
pub async fn build(spec: &SinkSpec, health: Health, metrics: Metrics) -> Result<Arc<dyn SinkIntegration>, SinkError> {
    if let Some(c) = &spec.udp {
        return Ok(Arc::new(udp::UdpSink::connect(c.clone(), health).await?));
    }
    if let Some(c) = &spec.file {
        return Ok(Arc::new(file::FileSink::open(c.clone(), health)?));
    }
    if let Some(c) = &spec.kafka {
        return Ok(Arc::new(kafka::KafkaSink::connect(c.clone(), health, metrics.clone()).await?));
    }
    if let Some(c) = &spec.postgres {
        return Ok(Arc::new(postgres::PostgresSink::connect(c.clone(), health, metrics).await?));
    }
    if let Some(c) = &spec.redis_hash {
        return Ok(Arc::new(redis_hash::RedisHashSink::connect(c.clone(), health, metrics.clone()).await?));
    }
    if let Some(c) = &spec.s3 {
        return Ok(Arc::new(s3::S3Sink::connect(c.clone(), health).await?));
    }
    if let Some(c) = &spec.kinesis {
        return Ok(Arc::new(kinesis::KinesisSink::connect(c.clone(), health).await?));
    }
    Err(SinkError::Permanent(format!("spec.sink: kind {:?} is not available in this build", spec.kind_names())))
}
