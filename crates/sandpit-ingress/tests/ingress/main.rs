//! The frontends against real backends on 127.0.0.1.

mod http;
mod support;
mod tcp;
mod tls;
