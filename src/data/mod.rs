//! The RF1M annotation data layer (no GUI): the SQLite store, the labelling engine, import,
//! export and splits, agreement statistics, and the synthetic scale benchmark.

pub mod agreement;
pub mod bench;
pub mod export;
pub mod import;
pub mod session;
pub mod store;
