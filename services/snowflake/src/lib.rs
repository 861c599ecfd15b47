//! The Snowflake plugin.

pub mod meta;
pub mod sql;
pub mod status;
