//! Resource usage: after an exec's exit (from a newer and an older agent)
//! and of the main process.

use super::*;
use crate::Usage;

on_both_transports!(usage_follows_the_exit_or_is_absent);

async fn usage_follows_the_exit_or_is_absent<C: Connector>(make: Make<C>) {
    const USED: Usage = Usage {
        user_us: 7,
        sys_us: 8,
        max_rss_bytes: 9,
    };
    let f = make(
        3,
        handler(|mut s, first| async move {
            match first {
                Frame::MainUsage => s.put(Frame::Usage(USED)).await,
                Frame::Exec(req) => {
                    s.put(Frame::Started { pid: 1 }).await;
                    s.put(Frame::Exited(ExitStatus::Code(0))).await;
                    // An older agent closes the connection after the exit.
                    if req.argv[0] == "new" {
                        s.put(Frame::Usage(USED)).await;
                    }
                }
                other => panic!("{other:?}"),
            }
        }),
    );
    assert_eq!(f.client.main_usage().await.unwrap(), USED);
    for (argv0, want) in [("new", Some(USED)), ("old", None)] {
        let (mut events, _control) = f.client.exec(cmd(&[argv0])).await.unwrap().into_split();
        // Before the exit there is none, and nothing is read for it.
        assert_eq!(events.usage().await, None);
        assert_eq!(
            events.next_event().await.unwrap(),
            Some(ExecEvent::Exited(ExitStatus::Code(0)))
        );
        assert_eq!(events.usage().await, want, "{argv0}");
        // Taken once.
        assert_eq!(events.usage().await, None);
    }
    f.done().await;
}
