use super::*;

const M: &str = "manager1";

fn def() -> JobTypeDef {
    JobTypeDef {
        name: "foojob1".into(),
        inputs: vec!["text".into()],
        outputs: vec!["outSB".into()],
        body: "true".into(),
        timeout_seconds: 60,
        max_output_bytes: 1024,
        updated_at_ms: 0,
    }
}

fn req(keys: &[&str]) -> JobRequest {
    JobRequest {
        request_id: Uuid::from_u128(7),
        job_type: "foojob1".into(),
        parameter_keys: keys.iter().map(|s| s.to_string()).collect(),
        output_keys: vec!["outSB".into()],
        job_kvs: BTreeMap::new(),
        expires_at_ms: 1_000_000,
        manager_endpoint: "http://m:1".into(),
        publish_count: 1,
        workflow_id: None,
        needs: Default::default(),
        priority: 0,
    }
}

/// Answers `req(keys)` from manager M at `now` with default circumstances.
fn answer(
    def: Option<&JobTypeDef>,
    prior: Option<&Offer>,
    keys: &[&str],
    now: u64,
) -> Option<(Option<Offer>, Outbound)> {
    answer_request(
        def,
        prior,
        M,
        &req(keys),
        now,
        Uuid::new_v4,
        Answering::default(),
    )
}

fn job() -> Job {
    let (offer, _) = answer_request(
        Some(&def()),
        None,
        M,
        &req(&["text"]),
        10,
        || Uuid::from_u128(9),
        Answering::default(),
    )
    .expect("answer");
    let offer = offer.expect("offer");
    match accept(
        Some(&offer),
        Some(&def()),
        M,
        "http://m:1",
        offer.offer_id,
        Uuid::from_u128(5),
        20,
    )
    .expect("ok")
    {
        AcceptOutcome::Created(j, used, fx) => {
            assert_eq!(used.job_id, Some(j.id));
            assert!(matches!(
                &fx[..],
                [Effect::Send(Outbound {
                    msg: Msg::Accepted { .. },
                    ..
                })]
            ));
            *j
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn offers_for_matching_inputs_declines_otherwise() {
    let a = answer(Some(&def()), None, &["text"], 10).expect("answer");
    assert!(matches!(a.1.msg, Msg::Offer { .. }));
    let a = answer(Some(&def()), None, &["other"], 10).expect("answer");
    assert!(
        matches!(&a.1.msg, Msg::Decline { reason, .. } if reason.contains("takes inputs [text]"))
    );
    // A broadcast for a job type this agent lacks is not answered (the
    // manager knows it from the adverts); asked directly, it says why.
    assert!(answer(None, None, &["text"], 10).is_none());
    let asked = Answering {
        asked: true,
        ..Default::default()
    };
    let a =
        answer_request(None, None, M, &req(&["text"]), 10, Uuid::new_v4, asked).expect("answer");
    assert!(
        matches!(&a.1.msg, Msg::Decline { reason, .. } if reason.contains("no job type named foojob1"))
    );
    assert!(
        answer(Some(&def()), None, &["text"], 2_000_000).is_none(),
        "expired request"
    );
}

#[test]
fn a_republished_request_is_not_answered_again() {
    let (offer, _) = answer(Some(&def()), None, &["text"], 10).expect("answer");
    let offer = offer.expect("offer");
    // The offer waits in the outbox: a re-publication adds nothing.
    let again = answer(Some(&def()), Some(&offer), &["text"], 20);
    assert!(again.is_none());
    // Once the offer has expired, a new one is made.
    let later = answer(Some(&def()), Some(&offer), &["text"], offer.expires_at_ms).expect("answer");
    assert!(matches!(later.1.msg, Msg::Offer { offer_id, .. } if offer_id != offer.offer_id));
    // A decline is said once per request.
    let declined = Answering {
        declined_before: true,
        asked: true,
        ..Default::default()
    };
    assert!(answer_request(None, None, M, &req(&["text"]), 10, Uuid::new_v4, declined).is_none());
}

#[test]
fn needs_an_agent_can_never_meet_are_declined_only_when_asked() {
    let unmet = Answering {
        unmet: Some("this agent cannot ever run it: needs 8 CPUs, the agent has 4".into()),
        ..Default::default()
    };
    assert!(answer_request(
        Some(&def()),
        None,
        M,
        &req(&["text"]),
        10,
        Uuid::new_v4,
        unmet.clone()
    )
    .is_none());
    let asked = Answering {
        asked: true,
        ..unmet
    };
    let (offer, out) = answer_request(
        Some(&def()),
        None,
        M,
        &req(&["text"]),
        10,
        Uuid::new_v4,
        asked,
    )
    .expect("an answer");
    assert!(offer.is_none());
    assert!(
        matches!(&out.msg, Msg::Decline { reason, .. } if reason.contains("needs 8 CPUs")),
        "{out:?}"
    );
}

#[test]
fn a_manager_not_served_is_declined_with_the_reason() {
    let how = Answering {
        not_served: true,
        ..Default::default()
    };
    let (offer, out) = answer_request(
        Some(&def()),
        None,
        M,
        &req(&["text"]),
        10,
        Uuid::new_v4,
        how,
    )
    .expect("an answer");
    assert!(offer.is_none());
    match out.msg {
        Msg::Decline { reason, .. } => {
            assert!(reason.contains("--serve-managers"), "{reason}");
            assert!(reason.contains(M), "{reason}");
        }
        other => panic!("expected a decline, got {other:?}"),
    }
}

#[test]
fn an_offer_carries_the_agents_load() {
    let load = Load {
        slots: 4,
        free_slots: 1,
        queue_length: 9,
    };
    let how = Answering {
        load,
        ..Default::default()
    };
    let (_, out) = answer_request(
        Some(&def()),
        None,
        M,
        &req(&["text"]),
        10,
        Uuid::new_v4,
        how,
    )
    .expect("answer");
    assert!(matches!(out.msg, Msg::Offer { load: l, .. } if l == load));
}

#[test]
fn only_the_offered_manager_may_accept() {
    let (offer, _) = answer(Some(&def()), None, &["text"], 10).expect("answer");
    let offer = offer.expect("offer");
    let e = accept(
        Some(&offer),
        Some(&def()),
        "intruder",
        "e",
        offer.offer_id,
        Uuid::new_v4(),
        20,
    )
    .expect_err("refused");
    assert!(e.0.contains("only the manager an offer was made to"));
    let late = accept(
        Some(&offer),
        Some(&def()),
        M,
        "e",
        offer.offer_id,
        Uuid::new_v4(),
        offer.expires_at_ms + 1,
    )
    .expect("answer");
    assert!(matches!(
        late,
        AcceptOutcome::Answer(Outbound {
            msg: Msg::Status(StatusUpdate {
                state: JobState::Failed,
                ..
            }),
            ..
        })
    ));
}

#[test]
fn queued_only_when_every_input_is_there_and_data_is_not_applied_twice() {
    let mut j = job();
    assert_eq!(j.state, JobState::Pending);
    let fx = j
        .on_data(M, &BTreeMap::from([("text".into(), "a".into())]), None, 0)
        .expect("data");
    assert_eq!(j.state, JobState::Queued);
    assert!(fx.contains(&Effect::Enqueue(j.id)));
    let fx = j
        .on_data(M, &BTreeMap::from([("text".into(), "b".into())]), None, 0)
        .expect("data");
    assert!(fx.is_empty());
    assert_eq!(j.values.get("text").map(String::as_str), Some("a"));
    assert!(j.on_data("other", &BTreeMap::new(), None, 0).is_err());
}

#[test]
fn inputs_that_cannot_be_fetched_fail_the_job_before_it_runs() {
    let mut j = job();
    let fx = j
        .on_data(
            M,
            &BTreeMap::from([("text".into(), "a".into())]),
            Some("more bytes than declared"),
            7,
        )
        .expect("data");
    assert_eq!(j.state, JobState::Failed);
    assert!(!fx.contains(&Effect::Enqueue(j.id)), "it never runs");
    assert!(
        j.message.contains("cannot be fetched from the manager")
            && j.message.contains("more bytes than declared"),
        "{}",
        j.message
    );
    assert!(fx.iter().any(|e| matches!(
        e,
        Effect::Send(Outbound {
            msg: Msg::Status(StatusUpdate {
                state: JobState::Failed,
                ..
            }),
            ..
        })
    )));
}

#[test]
fn run_completes_with_outputs_sent_before_status() {
    let mut j = job();
    j.on_data(M, &BTreeMap::from([("text".into(), "a".into())]), None, 0)
        .expect("data");
    j.on_started(30);
    assert_eq!(j.state, JobState::Running);
    let fx = j.on_finished(
        RunResult::Completed {
            outputs: BTreeMap::from([("outSB".into(), "prependa".into())]),
            stderr_tail: String::new(),
        },
        40,
    );
    assert!(matches!(
        &fx[0],
        Effect::Send(Outbound {
            msg: Msg::Data { .. },
            ..
        })
    ));
    assert!(matches!(
        &fx[1],
        Effect::Send(Outbound {
            msg: Msg::Status(StatusUpdate {
                state: JobState::Completed,
                ..
            }),
            ..
        })
    ));
}

#[test]
fn kill_stops_a_running_job_and_restart_requeues_it() {
    let mut j = job();
    j.on_data(M, &BTreeMap::from([("text".into(), "a".into())]), None, 0)
        .expect("data");
    j.on_started(30);
    let mut r = j.clone();
    let fx = j.on_kill(M, "cancelled", 50).expect("kill");
    assert!(fx.contains(&Effect::StopProcess(j.id)));
    assert_eq!(j.state, JobState::Cancelled);
    assert!(j
        .on_finished(
            RunResult::Completed {
                outputs: BTreeMap::new(),
                stderr_tail: String::new()
            },
            60
        )
        .is_empty());
    let fx = r.on_restart();
    assert_eq!(r.state, JobState::Queued);
    assert!(fx.contains(&Effect::Enqueue(r.id)));
}
