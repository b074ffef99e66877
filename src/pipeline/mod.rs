//! Generation: scheduling, the SD 1.5 + ControlNet sampler, and (later) the ad pipeline and the
//! recurrent loop.

pub mod scheduler;
pub mod sd;
