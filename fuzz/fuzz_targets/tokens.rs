#![no_main]
// See lab-server/src/fuzzing for what the target checks and its input format.
libfuzzer_sys::fuzz_target!(|data: &[u8]| lab_server::fuzzing::tokens(data));
