//! Decoders never panic: arbitrary bytes and arbitrary structured values
//! fed to everything that takes input from outside the node — envelopes
//! (as bytes, and validly signed with absurd content), every protocol
//! message and its conversion to domain types, gossip request checks and
//! CWL documents. Job-type files and the configuration file have their own
//! properties in the CLI and node crates.
//!
//! `make test` runs a few thousand cases per property; `make fuzz` sets
//! `CARONI_FUZZ_CASES=100000` and prints each property's count and time.

use caroni_proto::v1::{self as pb, message::Payload};
use caroni_types::msg::Msg;
use libp2p::identity::Keypair;
use proptest::prelude::*;
use prost::Message as _;

fn cases() -> u32 {
    std::env::var("CARONI_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Runs a property and prints how many cases it took and how long.
fn timed(name: &str, run: impl FnOnce()) {
    let start = std::time::Instant::now();
    run();
    println!(
        "{name}: {} cases in {:.1} s, no panic",
        cases(),
        start.elapsed().as_secs_f64()
    );
}

/// Everything a receiver does with a verified message: open, convert,
/// check a request.
fn receive(env: &pb::Envelope) {
    if let Ok(msgs) = caroni_peer::open_all(env) {
        for m in msgs {
            if let Ok(Msg::Request(r)) = Msg::try_from(m.payload) {
                let _ = r.check(caroni_types::now_ms());
            }
        }
    }
    let _ = caroni_peer::envelope::claimed_ids(env);
}

fn key() -> &'static Keypair {
    static KEY: std::sync::OnceLock<Keypair> = std::sync::OnceLock::new();
    KEY.get_or_init(Keypair::generate_ed25519)
}

fn signed(body: Vec<u8>, batch: bool) -> pb::Envelope {
    pb::Envelope {
        signature: key().sign(&body).unwrap_or_default(),
        public_key: key().public().encode_protobuf(),
        body,
        batch,
    }
}

fn any_timestamp() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
    proptest::option::of(
        (any::<i64>(), any::<i32>())
            .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
    )
}

/// Strings as peers might send them: ids, names, long or odd text.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(uuid::Uuid::now_v7().to_string()),
        "[a-zA-Z_][a-zA-Z0-9_]{0,70}",
        ".{0,40}",
        (0usize..5000).prop_map(|n| "x".repeat(n)),
    ]
}

fn any_payload() -> impl Strategy<Value = Payload> {
    let names = || proptest::collection::vec(any_text(), 0..4);
    prop_oneof![
        (
            any_text(),
            any_text(),
            names(),
            names(),
            proptest::collection::hash_map(any_text(), any_text(), 0..4),
            any_timestamp(),
            any_text(),
            any::<u32>()
        )
            .prop_map(
                |(
                    request_id,
                    job_type,
                    parameter_keys,
                    output_keys,
                    job_kvs,
                    expires_at,
                    manager_endpoint,
                    publish_count,
                )| {
                    Payload::JobFulfillmentRequest(pb::JobFulfillmentRequest {
                        // Arbitrary text as the workflow id too.
                        workflow_id: request_id.chars().rev().collect(),
                        request_id,
                        job_type,
                        parameter_keys,
                        output_keys,
                        // Arbitrary labels wanted, as the static parameters.
                        labels: job_kvs.clone(),
                        job_kvs,
                        expires_at,
                        manager_endpoint,
                        publish_count,
                        needs: None,
                        max_charge_milli: Some(u64::from(publish_count)),
                        priority: publish_count as i32,
                    })
                }
            ),
        (
            any_text(),
            any_text(),
            any_timestamp(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>()
        )
            .prop_map(
                |(offer_id, request_id, expires_at, slots, free_slots, queue_length)| {
                    Payload::JobFulfillmentOffer(pb::JobFulfillmentOffer {
                        offer_id,
                        request_id,
                        expires_at,
                        slots,
                        free_slots,
                        queue_length,
                        // Arbitrary prices too.
                        price: Some(pb::Price {
                            fixed_milli: u64::from(slots) << 20,
                            per_second_milli: u64::from(free_slots),
                        }),
                        max_charge_milli: u64::from(queue_length).wrapping_mul(u64::MAX / 7),
                    })
                }
            ),
        (any_text(), any_text()).prop_map(|(request_id, reason)| {
            Payload::JobFulfillmentDecline(pb::JobFulfillmentDecline { request_id, reason })
        }),
        (any_text(), any_text(), any_text()).prop_map(|(offer_id, request_id, job_id)| {
            Payload::JobFulfillmentOfferAccept(pb::JobFulfillmentOfferAccept {
                offer_id,
                request_id,
                job_id,
            })
        }),
        (any_text(), any_text()).prop_map(|(offer_id, request_id)| {
            Payload::JobFulfillmentOfferReject(pb::JobFulfillmentOfferReject {
                offer_id,
                request_id,
            })
        }),
        (any_text(), any_text()).prop_map(|(job_id, offer_id)| Payload::JobAccepted(
            pb::JobAccepted { job_id, offer_id }
        )),
        any_text().prop_map(|job_id| Payload::JobStatusRequest(pb::JobStatusRequest { job_id })),
        (
            any_text(),
            any::<i32>(),
            any_text(),
            any::<Option<i32>>(),
            any_text(),
            any::<u64>()
        )
            .prop_map(
                |(job_id, state, message, exit_status, stderr_tail, sequence)| {
                    Payload::JobStatusUpdate(pb::JobStatusUpdate {
                        job_id,
                        state,
                        message: message.clone(),
                        exit_status,
                        stderr_tail: stderr_tail.clone(),
                        sequence,
                        executor: message.chars().rev().collect(),
                        external_id: stderr_tail.chars().take(300).collect(),
                        queued_at_ms: sequence,
                        started_at_ms: sequence / 2,
                        ended_at_ms: u64::MAX - sequence,
                        failure: message.clone(),
                        receipt: (sequence % 2 == 0).then(|| pb::JobReceipt {
                            job_id: message.clone(),
                            workflow_id: stderr_tail.clone(),
                            state,
                            wall_ms: sequence,
                            max_charge_milli: sequence / 3,
                            charge_milli: sequence,
                            signature: stderr_tail.as_bytes().to_vec(),
                            ..Default::default()
                        }),
                    })
                }
            ),
        (any_text(), any::<bool>(), any_text()).prop_map(|(job_id, agreed, reason)| {
            Payload::ReceiptVerdicts(pb::ReceiptVerdicts {
                verdicts: vec![pb::ReceiptVerdict {
                    job_id,
                    agreed,
                    signature: reason.as_bytes().to_vec(),
                    reason,
                }],
            })
        }),
        (
            any_text(),
            proptest::collection::vec((any_text(), any_text()), 0..4),
            any::<bool>()
        )
            .prop_map(|(job_id, items, outputs)| {
                Payload::JobDataAvailable(pb::JobDataAvailable {
                    job_id,
                    items: items
                        .into_iter()
                        .map(|(name, value)| pb::DataItem { name, value })
                        .collect(),
                    outputs,
                })
            }),
        (any_text(), any_text())
            .prop_map(|(job_id, reason)| Payload::JobKill(pb::JobKill { job_id, reason })),
    ]
}

fn any_message() -> impl Strategy<Value = pb::Message> {
    let me = key().public().to_peer_id().to_base58();
    (
        any_text(),
        prop_oneof![Just(me), any_text()],
        any_timestamp(),
        any_text(),
        prop_oneof![Just(uuid::Uuid::now_v7().to_string()), any_text()],
        proptest::option::of(any_payload()),
    )
        .prop_map(
            |(message_id, sender, sent_at, sender_endpoint, trace_id, payload)| pb::Message {
                message_id,
                sender,
                sent_at,
                sender_endpoint,
                trace_id,
                payload,
            },
        )
}

#[test]
fn decoders_never_panic_on_envelope_bytes() {
    timed("envelope bytes", || {
        proptest!(config(), |(bytes in proptest::collection::vec(any::<u8>(), 0..2048))| {
            if let Ok(env) = pb::Envelope::decode(bytes.as_slice()) {
                receive(&env);
            }
            // The same bytes as the body of a validly signed envelope,
            // single and batch.
            receive(&signed(bytes.clone(), false));
            receive(&signed(bytes, true));
        });
    });
}

#[test]
fn decoders_never_panic_on_signed_messages_with_absurd_content() {
    timed("signed messages", || {
        proptest!(config(), |(m in any_message(), batch in proptest::collection::vec(any_message(), 0..4))| {
            receive(&signed(m.encode_to_vec(), false));
            receive(&signed(pb::MessageBatch { messages: batch }.encode_to_vec(), true));
        });
    });
}

#[test]
fn decoders_never_panic_on_payload_bytes() {
    timed("payload bytes", || {
        proptest!(config(), |(tag in 10u32..=19, content in proptest::collection::vec(any::<u8>(), 0..1024))| {
            // A message whose payload field holds arbitrary bytes.
            let mut body = Vec::new();
            prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, &mut body);
            prost::encoding::encode_varint(content.len() as u64, &mut body);
            body.extend_from_slice(&content);
            if let Ok(Some(p)) = pb::Message::decode(body.as_slice()).map(|m| m.payload) {
                let _ = Msg::try_from(p);
            }
        });
    });
}

/// YAML-ish documents: random nesting of mappings, sequences and scalars,
/// some with the keys a workflow uses.
fn any_yaml() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any_text().prop_map(serde_yaml_ng::Value::String),
        any::<i64>().prop_map(|n| serde_yaml_ng::Value::Number(n.into())),
        any::<bool>().prop_map(serde_yaml_ng::Value::Bool),
        Just(serde_yaml_ng::Value::Null),
    ];
    let key = prop_oneof![
        Just("class".to_string()),
        Just("inputs".to_string()),
        Just("outputs".to_string()),
        Just("steps".to_string()),
        Just("in".to_string()),
        Just("out".to_string()),
        Just("run".to_string()),
        Just("source".to_string()),
        Just("outputSource".to_string()),
        Just("hints".to_string()),
        Just("type".to_string()),
        Just("Workflow".to_string()),
        any_text(),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_yaml_ng::Value::Sequence),
            proptest::collection::vec((key.clone(), inner), 0..6).prop_map(|kv| {
                serde_yaml_ng::Value::Mapping(
                    kv.into_iter()
                        .map(|(k, v)| (serde_yaml_ng::Value::String(k), v))
                        .collect(),
                )
            }),
        ]
    })
    .prop_map(|v| serde_yaml_ng::to_string(&v).unwrap_or_default())
}

#[test]
fn the_cwl_parser_never_panics() {
    timed("CWL documents", || {
        proptest!(config(), |(doc in any_yaml(), text in ".{0,300}")| {
            let _ = caroni_cwl::parse(&doc);
            let _ = caroni_cwl::parse(&text);
            let with_class = format!("class: Workflow\n{doc}");
            let _ = caroni_cwl::parse(&with_class);
        });
    });
}
