//! The RF1M annotation data layer (no GUI): the store (SQLite, or PostgreSQL for teams), the
//! labelling engine, import, export and splits, copies between stores, agreement statistics, and
//! the synthetic scale benchmark.

pub mod agreement;
pub mod bench;
pub mod catalogue;
pub mod export;
pub mod import;
pub mod migrate;
pub mod session;
pub mod store;
