//! The Caroni wire contract: messages and services generated from
//! `proto/caroni/v1/*.proto`, plus the small conversions needed at the edge
//! (timestamps, job states).
//!
//! This crate owns generated code only; it must not depend on any engine,
//! on storage or on libp2p.

pub mod convert;

/// Generated `caroni.v1` package.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("caroni.v1");
}

/// Encoded `FileDescriptorSet` of every Caroni `.proto` file (with its
/// imports), for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/caroni_descriptor.bin"));

/// Converts a `SystemTime` to a protobuf timestamp.
pub fn timestamp(t: std::time::SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

/// Converts milliseconds since the Unix epoch to a protobuf timestamp.
pub fn timestamp_ms(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// Converts a protobuf timestamp to milliseconds since the Unix epoch
/// (negative instants become 0, instants past the range saturate). Every
/// operation is checked: the values come from peers.
pub fn timestamp_to_ms(t: &prost_types::Timestamp) -> u64 {
    let ms = t
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos / 1_000_000));
    u64::try_from(ms).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_timestamps_from_peers_saturate_instead_of_panicking() {
        let far = prost_types::Timestamp {
            seconds: i64::MAX,
            nanos: 999_999_999,
        };
        assert_eq!(timestamp_to_ms(&far), i64::MAX as u64);
        let past = prost_types::Timestamp {
            seconds: i64::MIN,
            nanos: -999_999_999,
        };
        assert_eq!(timestamp_to_ms(&past), 0);
    }

    #[test]
    fn timestamps_round_trip_in_milliseconds() {
        for ms in [0u64, 1, 999, 1_000, 1_732_000_123_456] {
            assert_eq!(timestamp_to_ms(&timestamp_ms(ms)), ms);
        }
    }

    #[test]
    fn descriptor_set_names_every_service() {
        use prost::Message;
        let fds = prost_types::FileDescriptorSet::decode(FILE_DESCRIPTOR_SET).expect("descriptor");
        let services: Vec<String> = fds
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| s.name().to_string()))
            .collect();
        for s in [
            "PeerService",
            "ManagerService",
            "AgentService",
            "NodeService",
        ] {
            assert!(
                services.iter().any(|x| x == s),
                "{s} missing from {services:?}"
            );
        }
    }
}
