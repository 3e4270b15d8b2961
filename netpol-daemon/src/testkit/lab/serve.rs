//! The pods' servers: every declared TCP port answers each line with the pod's name and port,
//! every UDP port answers each datagram likewise, until the lab stops.
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;

use super::{in_netns, Lab};

impl Lab {
    pub(super) fn serve(&mut self, i: usize, ip: IpAddr) -> Result<()> {
        let pod = self.pods[i].clone();
        for port in pod.tcp.clone() {
            let addr = SocketAddr::new(ip, port);
            let l = in_netns(&pod.netns, move || TcpListener::bind(addr))??;
            l.set_nonblocking(true)?;
            let stop = self.stop.clone();
            let reply = format!("{} tcp/{port}\n", pod.key());
            self.servers.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, _)) => {
                            // Answer every message until the client closes (or 5 s of silence).
                            let reply = reply.clone();
                            std::thread::spawn(move || {
                                let _ = s.set_nonblocking(false);
                                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                                let mut buf = [0u8; 256];
                                while let Ok(n) = s.read(&mut buf) {
                                    if n == 0 || s.write_all(reply.as_bytes()).is_err() {
                                        break;
                                    }
                                }
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        for port in pod.udp.clone() {
            let addr = SocketAddr::new(ip, port);
            let s = in_netns(&pod.netns, move || UdpSocket::bind(addr))??;
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            let stop = self.stop.clone();
            let reply = format!("{} udp/{port}\n", pod.key());
            self.servers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, from)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(reply.as_bytes(), from);
                    }
                }
            }));
        }
        Ok(())
    }
}
