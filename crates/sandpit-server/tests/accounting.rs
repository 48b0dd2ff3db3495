//! `sandpit.v1.Accounting` over gRPC without root: execs through the real
//! handlers, the manager, the async agent client and the in-memory agent
//! (which reports a fixed usage after each exit, as the real one reports
//! its `wait4`), then ListCommands.

use sandpit_proto::sandbox::v1 as pb;
use sandpit_proto::sandpit::v1 as spb;
use sandpit_proto::sandpit::v1::accounting_client::AccountingClient;
use sandpit_server::fake::FAKE_USAGE;
use tonic::metadata::MetadataValue;
use tonic::Code;
use tonic_types::StatusExt;

mod common;
use common::*;

async fn sandbox(server: &Server) -> String {
    let spec = pb::SandboxSpec {
        containers: vec![pb::Container {
            name: "main".into(),
            image: "python:3.11".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let req = pb::CreateSandboxRequest {
        sandbox: Some(pb::Sandbox {
            spec: Some(spec),
            ..Default::default()
        }),
        request_id: String::new(),
    };
    let sb = server
        .client()
        .await
        .create_sandbox(with_key(req, ALICE))
        .await
        .unwrap()
        .into_inner();
    sb.sandbox_id
}

#[tokio::test]
async fn execs_are_listed_with_usage_and_outcome_to_their_owner_only() {
    let server = start().await;
    let id = sandbox(&server).await;
    let mut c = server.client().await;
    let exec = |argv: &[&str]| pb::ExecRequest {
        sandbox_id: id.clone(),
        command: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    for argv in [&["exit", "3"][..], &["nope"]] {
        c.exec(with_key(exec(argv), ALICE)).await.unwrap();
    }
    let mut timed = with_key(exec(&["sleep"]), ALICE);
    timed
        .metadata_mut()
        .insert("grpc-timeout", MetadataValue::from_static("200m"));
    assert_eq!(
        c.exec(timed).await.unwrap_err().code(),
        Code::DeadlineExceeded
    );

    let mut acct = AccountingClient::new(server.channel().await);
    let list = |key| {
        with_key(
            spb::ListCommandsRequest {
                sandbox_id: id.clone(),
            },
            key,
        )
    };
    let got = acct.list_commands(list(ALICE)).await.unwrap().into_inner();
    let summary: Vec<_> = got
        .commands
        .iter()
        .map(|c| (c.id.as_str(), c.argv.join(" "), c.outcome, c.exit_code))
        .collect();
    use spb::CommandOutcome as O;
    assert_eq!(
        summary,
        vec![
            ("exec-1", "exit 3".into(), O::Exited as i32, Some(3)),
            (
                "exec-2",
                "nope".into(),
                O::InfrastructureError as i32,
                Some(127)
            ),
            ("exec-3", "sleep".into(), O::TimedOut as i32, None),
        ]
    );
    // The agent's usage of the one that exited; none for the others.
    let first = &got.commands[0];
    assert_eq!(first.peak_memory_bytes, Some(FAKE_USAGE.max_rss_bytes));
    assert_eq!(first.cpu_user_seconds, Some(0.0015));
    assert_eq!(first.cpu_system_seconds, Some(0.0005));
    assert!(got.commands[1..]
        .iter()
        .all(|c| c.peak_memory_bytes.is_none()));
    assert!(!got.commands[1].detail.is_empty());

    // Bob's view: not found, like an unknown id; no id at all is a bad request.
    for (key, sandbox_id) in [(BOB, id.clone()), (ALICE, "0123456789ab".into())] {
        let e = acct
            .list_commands(with_key(spb::ListCommandsRequest { sandbox_id }, key))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        let info = e.get_error_details().error_info().cloned().unwrap();
        assert_eq!(info.reason, "CWSANDBOX_SANDBOX_NOT_FOUND");
    }
    let e = acct
        .list_commands(with_key(
            spb::ListCommandsRequest {
                sandbox_id: String::new(),
            },
            ALICE,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let v = e.get_error_details().bad_request().cloned().unwrap();
    assert_eq!(v.field_violations[0].field, "sandbox_id");
}
