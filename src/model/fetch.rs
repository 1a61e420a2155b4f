//! Fetching the embedded default model. (Filled in below.)
