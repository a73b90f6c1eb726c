//! The black-box test suite of the CDP lives in `suite/` (one test binary, `cdp`); this library is empty.
