use std::net::SocketAddr;

use sandpit_ingress::{TcpPorts, TcpPortsConfig, TcpPortsError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// A raw TCP echo server.
async fn echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn ports(port: u16) -> TcpPorts {
    TcpPorts::new(TcpPortsConfig::new(
        "127.0.0.1".parse().unwrap(),
        port..=port,
    ))
}

#[tokio::test]
async fn forwards_releases_and_runs_out() {
    let backend = echo().await;
    let port = free_port();
    let ports = ports(port);
    assert_eq!(ports.publish("sb-a", 22, backend).unwrap(), port);
    // The same publication again is the same port.
    assert_eq!(ports.publish("sb-a", 22, backend).unwrap(), port);
    assert_eq!(ports.host_port("sb-a", 22), Some(port));

    let mut c = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    c.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");

    // One port in the range, and it is taken.
    assert!(matches!(
        ports.publish("sb-b", 22, backend),
        Err(TcpPortsError::Exhausted(_))
    ));
    assert!(matches!(
        ports.publish("sb-a", 22, echo().await),
        Err(TcpPortsError::AlreadyPublished { .. })
    ));

    // Release closes the open connection and the listener.
    assert_eq!(ports.release("sb-a", 22).await, Some(port));
    assert!(read_to_close(&mut c).await.is_empty());
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err());
    assert_eq!(ports.host_port("sb-a", 22), None);
    assert_eq!(ports.release("sb-a", 22).await, None);

    // The port is free again.
    assert_eq!(ports.publish("sb-b", 22, backend).unwrap(), port);
    assert_eq!(ports.release_sandbox("sb-b").await, 1);
}

#[tokio::test]
async fn ports_in_use_elsewhere_are_skipped() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let ports = ports(port);
    let err = ports.publish("sb-a", 22, echo().await).unwrap_err();
    assert!(matches!(err, TcpPortsError::Exhausted(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("no free host port in {port}-{port}")
    );
    assert!(matches!(
        ports.publish("Bad_Id", 22, echo().await),
        Err(TcpPortsError::BadSandboxId(_))
    ));
}
