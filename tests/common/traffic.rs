//! Traffic kept running while the daemon is killed and restarted (the restart tests of every
//! attach mode): one long-lived allowed connection exchanging a line every 10 ms, new allowed
//! connections in a loop, and denied attempts in loops of their own.
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use netpol_daemon::testkit::lab::{in_netns, probe_tcp, Lab};

#[derive(Default)]
struct Tally {
    stop: AtomicBool,
    long_fail: AtomicUsize,
    exchanges: AtomicUsize,
    new_ok: AtomicUsize,
    new_fail: AtomicUsize,
    denied_passed: AtomicUsize,
    denied_tries: AtomicUsize,
}

/// What the traffic saw, once stopped.
#[derive(Debug)]
pub struct Seen {
    /// The long-lived connection broke (0 or 1), and how many lines it exchanged.
    pub long_fail: usize,
    pub exchanges: usize,
    /// New allowed connections that worked and that failed.
    pub new_ok: usize,
    pub new_fail: usize,
    /// Denied attempts that got through, of how many.
    pub denied_passed: usize,
    pub denied_tries: usize,
}

pub struct Traffic {
    tally: Arc<Tally>,
    threads: Vec<JoinHandle<()>>,
}

impl Traffic {
    /// Starts the traffic to `server`: allowed from `client`, denied from `intruder` in
    /// `denied_loops` loops at once.
    pub fn start(lab: &Lab, client: &str, intruder: &str, server: SocketAddr, denied_loops: usize) -> Traffic {
        let tally = Arc::new(Tally::default());
        let in_pod = |pod: &str, work: fn(&Tally, SocketAddr)| {
            let (t, ns) = (tally.clone(), lab.pod(pod).netns.clone());
            std::thread::spawn(move || in_netns(&ns, move || work(&t, server)).unwrap())
        };
        let mut threads = vec![in_pod(client, long_lived), in_pod(client, new_connections)];
        threads.extend((0..denied_loops).map(|_| in_pod(intruder, denied_attempts)));
        Traffic { tally, threads }
    }

    /// Denied attempts made so far.
    pub fn denied_tries(&self) -> usize {
        self.tally.denied_tries.load(Ordering::SeqCst)
    }

    /// Stops the traffic and says what it saw.
    pub fn finish(self) -> Seen {
        self.tally.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().unwrap();
        }
        let t = &self.tally;
        let get = |a: &AtomicUsize| a.load(Ordering::SeqCst);
        Seen {
            long_fail: get(&t.long_fail),
            exchanges: get(&t.exchanges),
            new_ok: get(&t.new_ok),
            new_fail: get(&t.new_fail),
            denied_passed: get(&t.denied_passed),
            denied_tries: get(&t.denied_tries),
        }
    }
}

fn long_lived(t: &Tally, server: SocketAddr) {
    let mut s = std::net::TcpStream::connect_timeout(&server, Duration::from_secs(1)).expect("long-lived connect");
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 128];
    while !t.stop.load(Ordering::SeqCst) {
        if s.write_all(b"x\n").is_err() || !matches!(s.read(&mut buf), Ok(n) if n > 0) {
            t.long_fail.fetch_add(1, Ordering::SeqCst);
            return;
        }
        t.exchanges.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn new_connections(t: &Tally, server: SocketAddr) {
    while !t.stop.load(Ordering::SeqCst) {
        let counter = if probe_tcp(server, Duration::from_secs(1)) { &t.new_ok } else { &t.new_fail };
        counter.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn denied_attempts(t: &Tally, server: SocketAddr) {
    while !t.stop.load(Ordering::SeqCst) {
        t.denied_tries.fetch_add(1, Ordering::SeqCst);
        if probe_tcp(server, Duration::from_millis(150)) {
            t.denied_passed.fetch_add(1, Ordering::SeqCst);
        }
    }
}
