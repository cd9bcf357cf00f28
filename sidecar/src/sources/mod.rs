//! Source integrations, one folder per kind. Each implements [`SourceIntegration`]; [`build`] picks one from
//! the manifest.
use wallaroo_crds::SourceSpec;

use crate::runtime::source_api::{SourceError, SourceIntegration};

pub mod file;
pub mod kafka;
pub mod kinesis;
pub mod postgres;
pub mod rabbitmq;
pub mod redis;
pub mod udp;

/// The integration for the (validated) source spec.
pub fn build(spec: &SourceSpec) -> Result<Box<dyn SourceIntegration>, SourceError> {
    if let Some(c) = &spec.udp {
        return Ok(Box::new(udp::UdpSource::new(c.clone())));
    }
    if let Some(c) = &spec.file {
        return Ok(Box::new(file::FileSource::new(c.clone())));
    }
    if let Some(c) = &spec.kafka {
        return Ok(Box::new(kafka::KafkaSource::new(c.clone())));
    }
    if let Some(c) = &spec.kinesis {
        return Ok(Box::new(kinesis::KinesisSource::new(c.clone())));
    }
    if let Some(c) = &spec.postgres {
        return Ok(Box::new(postgres::PostgresSource::new(c.clone())));
    }
    if let Some(c) = &spec.rabbitmq {
        return Ok(Box::new(rabbitmq::RabbitmqSource::new(c.clone())));
    }
    if let Some(c) = &spec.redis {
        return Ok(Box::new(redis::RedisSource::new(c.clone())));
    }
    Err(SourceError::Config(format!("spec.source: kind {:?} is not available in this build", spec.kind_names())))
}
