pub mod inject;
pub mod run;
pub mod sidecar;
