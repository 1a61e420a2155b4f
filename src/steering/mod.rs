//! Steering: what a request may ask for (`spec`), the vectors it can name (`vector`, `store`),
//! and how a plan acts inside the forward pass (`intervention`).

pub mod compact;
pub mod extract;
pub mod formats;
pub mod inspect;
pub mod intervention;
pub mod lens;
pub mod patch;
pub mod sae;
pub mod sae_train;
pub mod spec;
pub mod store;
pub mod vector;
