//! Gateway integration tests: the real gateway in-process, in front of real
//! plugin services on 127.0.0.1.

mod auth;
mod balancing;
mod check_config;
mod dns;
mod load;
mod logs;
mod request_id;
mod routing;
mod shutdown;
mod status;
mod support;
mod tls;
