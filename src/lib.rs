//! tiller: an HTTP inference server for activation steering.
//!
//! Dependencies run one way: `api` -> `engine` -> `steering` -> `model` (DESIGN §1).

pub mod model;
