//! One integration binary for every black-box test.
mod cli;
mod crash;
mod e2e;
