//! TEMPORARY: stands in for `sandpit_wire::Signal` until the wire branch lands.

/// TEMPORARY: stands in for `sandpit_wire::Signal`.
#[derive(Debug)]
pub(crate) struct Signal;

impl Signal {
    pub(crate) const TERM: i32 = 15;
}
