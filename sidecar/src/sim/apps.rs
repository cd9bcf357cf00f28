//! Application functions the simulated worker can run between its source and its sink.
use bytes::Bytes;

/// A pipeline step: decode the source payload, compute, encode the sink payload (`None` filters it out).
pub type AppFn = fn(&[u8]) -> Option<Bytes>;

/// Upstream's Celsius tutorial: a big-endian f32 Celsius reading becomes Fahrenheit text (`x * 1.8 + 32`).
pub fn celsius_to_fahrenheit(payload: &[u8]) -> Option<Bytes> {
    let bytes: [u8; 4] = payload.try_into().ok()?;
    let c = f32::from_be_bytes(bytes);
    let f = c * 1.8 + 32.0;
    Some(Bytes::from(format!("{f:.1}\n")))
}

pub fn identity(payload: &[u8]) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(payload))
}

pub fn by_name(name: &str) -> Option<AppFn> {
    match name {
        "celsius" => Some(celsius_to_fahrenheit),
        "identity" => Some(identity),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celsius_converts() {
        assert_eq!(celsius_to_fahrenheit(&100f32.to_be_bytes()).unwrap(), Bytes::from("212.0\n"));
        assert_eq!(celsius_to_fahrenheit(&(-40f32).to_be_bytes()).unwrap(), Bytes::from("-40.0\n"));
        assert!(celsius_to_fahrenheit(b"abc").is_none());
    }
}
