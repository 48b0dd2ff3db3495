//! Arbitrary valid [`Frame`]s: every variant, with arbitrary (unicode, NUL,
//! empty) strings, raw bytes and integers at their extremes.

use proptest::prelude::*;
use proptest::strategy::{BoxedStrategy, Union};
use sandpit_wire::{
    ErrorKind, ExecRequest, ExitStatus, Frame, InitFile, InitSpec, MainStatus, Probe, ProbeCheck,
    RunAs, Signal, StartupState, Usage, WinSize,
};

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        Just(String::new()),
        "[a-z/._-]{1,16}",
        any::<String>(),
        Just("\0..\u{fffd}\u{10ffff}".to_string()),
    ]
    .boxed()
}

fn texts() -> BoxedStrategy<Vec<String>> {
    proptest::collection::vec(text(), 0..4).boxed()
}

fn env() -> BoxedStrategy<Vec<(String, String)>> {
    proptest::collection::vec((text(), text()), 0..4).boxed()
}

fn bytes() -> BoxedStrategy<Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..64).boxed()
}

fn signal() -> BoxedStrategy<Signal> {
    (1i32..=64)
        .prop_filter_map("a valid signal", Signal::new)
        .boxed()
}

fn exit() -> BoxedStrategy<ExitStatus> {
    prop_oneof![
        any::<i32>().prop_map(ExitStatus::Code),
        signal().prop_map(ExitStatus::Signal),
    ]
    .boxed()
}

fn win() -> BoxedStrategy<WinSize> {
    (any::<u16>(), any::<u16>())
        .prop_map(|(cols, rows)| WinSize { cols, rows })
        .boxed()
}

fn error_kind() -> BoxedStrategy<ErrorKind> {
    proptest::sample::select(vec![
        ErrorKind::NotFound,
        ErrorKind::PermissionDenied,
        ErrorKind::IsDirectory,
        ErrorKind::NotRegularFile,
        ErrorKind::InvalidArgument,
        ErrorKind::SpawnFailed,
        ErrorKind::Io,
        ErrorKind::Protocol,
        ErrorKind::NotRunning,
    ])
    .boxed()
}

fn main_status() -> BoxedStrategy<MainStatus> {
    prop_oneof![
        Just(MainStatus::Idle),
        any::<u32>().prop_map(|pid| MainStatus::Running { pid }),
        exit().prop_map(MainStatus::Exited),
        text().prop_map(MainStatus::StartFailed),
    ]
    .boxed()
}

fn probe() -> BoxedStrategy<Option<Probe>> {
    let check = prop_oneof![
        texts().prop_map(ProbeCheck::Exec),
        any::<u16>().prop_map(|port| ProbeCheck::Tcp { port }),
        (any::<u16>(), text()).prop_map(|(port, path)| ProbeCheck::Http { port, path }),
    ];
    proptest::option::of((check, any::<[u32; 4]>()).prop_map(|(check, t)| Probe {
        check,
        initial_delay_ms: t[0],
        period_ms: t[1],
        timeout_ms: t[2],
        failure_threshold: t[3],
    }))
    .boxed()
}

fn init() -> BoxedStrategy<InitSpec> {
    let file = (text(), any::<u32>(), bytes()).prop_map(|(path, mode, content)| InitFile {
        path,
        mode,
        content,
    });
    (
        texts(),
        env(),
        text(),
        proptest::collection::vec(file, 0..3),
        (text(), text()),
        any::<Option<u64>>(),
        probe(),
    )
        .prop_map(
            |(argv, env, cwd, files, (user, group), capabilities, startup_probe)| InitSpec {
                argv,
                env,
                cwd,
                files,
                run_as: RunAs { user, group },
                capabilities,
                startup_probe,
            },
        )
        .boxed()
}

/// Any frame the protocol has.
pub(crate) fn arb_frame() -> BoxedStrategy<Frame> {
    let exec = (
        texts(),
        env(),
        proptest::option::of(text()),
        proptest::option::of(win()),
    )
        .prop_map(|(argv, env, cwd, tty)| {
            Frame::Exec(ExecRequest {
                argv,
                env,
                cwd,
                tty,
            })
        });
    let variants: Vec<BoxedStrategy<Frame>> = vec![
        Just(Frame::Ping).boxed(),
        main_status().prop_map(Frame::Pong).boxed(),
        exec.boxed(),
        any::<u32>().prop_map(|pid| Frame::Started { pid }).boxed(),
        bytes().prop_map(Frame::Stdin).boxed(),
        Just(Frame::StdinEof).boxed(),
        win().prop_map(Frame::Resize).boxed(),
        signal().prop_map(Frame::Signal).boxed(),
        bytes().prop_map(Frame::Stdout).boxed(),
        bytes().prop_map(Frame::Stderr).boxed(),
        exit().prop_map(Frame::Exited).boxed(),
        text().prop_map(|path| Frame::ReadFile { path }).boxed(),
        (any::<u64>(), any::<u32>())
            .prop_map(|(size, mode)| Frame::FileInfo { size, mode })
            .boxed(),
        bytes().prop_map(Frame::Data).boxed(),
        Just(Frame::End).boxed(),
        (text(), any::<u32>())
            .prop_map(|(path, mode)| Frame::WriteFile { path, mode })
            .boxed(),
        Just(Frame::Ok).boxed(),
        (error_kind(), text())
            .prop_map(|(kind, message)| Frame::Error { kind, message })
            .boxed(),
        (any::<u64>(), any::<bool>())
            .prop_map(|(offset, follow)| Frame::MainOutput { offset, follow })
            .boxed(),
        (any::<u64>(), any::<u64>())
            .prop_map(|(from, to)| Frame::Gap { from, to })
            .boxed(),
        (any::<u64>(), any::<u8>(), any::<u64>(), bytes())
            .prop_map(|(offset, stream, time_ns, data)| Frame::MainChunk {
                offset,
                stream,
                time_ns,
                data,
            })
            .boxed(),
        signal().prop_map(Frame::SignalMain).boxed(),
        init().prop_map(Frame::Init).boxed(),
        Just(Frame::AwaitStartup).boxed(),
        prop_oneof![
            Just(StartupState::Ready),
            text().prop_map(StartupState::Failed)
        ]
        .prop_map(Frame::Startup)
        .boxed(),
        (any::<u64>(), any::<u64>(), any::<u64>())
            .prop_map(|(user_us, sys_us, max_rss_bytes)| {
                Frame::Usage(Usage {
                    user_us,
                    sys_us,
                    max_rss_bytes,
                })
            })
            .boxed(),
        Just(Frame::MainUsage).boxed(),
    ];
    Union::new(variants).boxed()
}
