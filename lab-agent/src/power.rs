//! Power and boot device behind one trait, [`PowerControl`], with the real
//! implementation over our IPMI client ([`IpmiPower`]) and a simulator
//! ([`SimPower`]) that can be made unresponsive, slow or lossy on demand —
//! for the faults a real peer (`ipmi_sim`) cannot produce on cue. The
//! integration suites still use `ipmi_sim` through [`IpmiPower`].

use crate::ipmi::{BootDevice, ConnectOptions, IpmiClient, IpmiError, PowerAction, Secret};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

/// Why a power or boot-device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    /// The BMC did not answer (or the session could not be set up).
    #[error("BMC {bmc} unreachable")]
    Unreachable {
        bmc: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The BMC answered but refused or failed the operation.
    #[error("BMC {bmc} refused {operation}")]
    Refused {
        bmc: String,
        operation: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub type PowerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, PowerError>> + Send + 'a>>;

/// What the agent needs of a host's BMC.
pub trait PowerControl: Send + Sync {
    /// Is the host powered on?
    fn is_on(&self) -> PowerFuture<'_, bool>;
    /// Switch power (never blindly retried by implementations: an unclear
    /// outcome is re-read).
    fn set_power(&self, action: PowerAction) -> PowerFuture<'_, ()>;
    /// Boot device for the next boot (or every boot when `persistent`).
    fn set_boot_device(
        &self,
        device: BootDevice,
        efi: bool,
        persistent: bool,
    ) -> PowerFuture<'_, ()>;
}

/// A host's BMC over IPMI 2.0 lanplus; one session per operation.
pub struct IpmiPower {
    endpoint: SocketAddr,
    user: String,
    password: Secret,
    options: ConnectOptions,
}

use crate::metrics::{BmcOp, BmcOutcome};

impl std::fmt::Debug for IpmiPower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpmiPower")
            .field("endpoint", &self.endpoint)
            .field("user", &self.user)
            .finish()
    }
}

impl IpmiPower {
    pub fn new(
        endpoint: SocketAddr,
        user: String,
        password: Secret,
        options: ConnectOptions,
    ) -> Self {
        Self {
            endpoint,
            user,
            password,
            options,
        }
    }

    fn unreachable(&self, e: IpmiError) -> PowerError {
        PowerError::Unreachable {
            bmc: self.endpoint.to_string(),
            source: Box::new(e),
        }
    }

    fn refused(&self, operation: &'static str, e: IpmiError) -> PowerError {
        match e {
            IpmiError::Timeout { .. } => self.unreachable(e),
            e => PowerError::Refused {
                bmc: self.endpoint.to_string(),
                operation,
                source: Box::new(e),
            },
        }
    }

    async fn session(&self) -> Result<IpmiClient, PowerError> {
        IpmiClient::connect(
            self.endpoint,
            &self.user,
            self.password.clone(),
            self.options.clone(),
        )
        .await
        .map_err(|e| self.unreachable(e))
    }
}

/// Runs one BMC command and counts it in `/metrics` (its time and outcome).
async fn counted<T>(
    op: BmcOp,
    f: impl Future<Output = Result<T, PowerError>>,
) -> Result<T, PowerError> {
    let started = std::time::Instant::now();
    let r = f.await;
    let outcome = match &r {
        Ok(_) => BmcOutcome::Ok,
        Err(PowerError::Unreachable { .. }) => BmcOutcome::Unreachable,
        Err(_) => BmcOutcome::Refused,
    };
    crate::metrics::COUNTERS.bmc(op, outcome, started.elapsed());
    r
}

impl PowerControl for IpmiPower {
    fn is_on(&self) -> PowerFuture<'_, bool> {
        Box::pin(counted(BmcOp::ChassisStatus, async move {
            let c = self.session().await?;
            let r = c
                .chassis_status()
                .await
                .map(|s| s.power_on)
                .map_err(|e| self.refused("chassis status", e));
            let _ = c.close().await;
            r
        }))
    }

    fn set_power(&self, action: PowerAction) -> PowerFuture<'_, ()> {
        Box::pin(counted(BmcOp::ChassisControl, async move {
            let c = self.session().await?;
            let r = c
                .power(action)
                .await
                .map_err(|e| self.refused("chassis control", e));
            let _ = c.close().await;
            r
        }))
    }

    fn set_boot_device(
        &self,
        device: BootDevice,
        efi: bool,
        persistent: bool,
    ) -> PowerFuture<'_, ()> {
        Box::pin(counted(BmcOp::BootOptions, async move {
            let c = self.session().await?;
            let r = c
                .set_boot_device(device, efi, persistent)
                .await
                .map_err(|e| self.refused("boot options", e));
            let _ = c.close().await;
            r
        }))
    }
}

/// How the simulated BMC behaves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Responsiveness {
    /// Answers at once.
    Responsive,
    /// Never answers: every call fails as unreachable after `timeout`.
    Unresponsive { timeout: Duration },
    /// Answers after a delay.
    Slow(Duration),
    /// Every `n`th call is lost (fails as unreachable at once).
    Lossy { every: u32 },
}

#[derive(Debug)]
struct SimState {
    on: bool,
    boot: Option<(BootDevice, bool, bool)>,
    calls: u32,
    log: Vec<String>,
}

/// A simulated BMC for fault tests.
#[derive(Debug)]
pub struct SimPower {
    name: String,
    mode: Mutex<Responsiveness>,
    state: Mutex<SimState>,
}

impl SimPower {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            mode: Mutex::new(Responsiveness::Responsive),
            state: Mutex::new(SimState {
                on: false,
                boot: None,
                calls: 0,
                log: Vec::new(),
            }),
        }
    }

    pub fn set_responsiveness(&self, r: Responsiveness) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }

    /// Power state as the simulated chassis has it.
    pub fn powered_on(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).on
    }

    /// Boot override (device, efi, persistent) last set.
    pub fn boot(&self) -> Option<(BootDevice, bool, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).boot
    }

    /// Operations that reached the chassis, in order.
    pub fn log(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .log
            .clone()
    }

    fn lost(&self, why: &str) -> PowerError {
        PowerError::Unreachable {
            bmc: self.name.clone(),
            source: why.to_owned().into(),
        }
    }

    /// Apply the responsiveness, then run `f` on the state.
    async fn op<T>(&self, f: impl FnOnce(&mut SimState) -> T) -> Result<T, PowerError> {
        let mode = *self.mode.lock().unwrap_or_else(|p| p.into_inner());
        let n = {
            let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.calls += 1;
            s.calls
        };
        match mode {
            Responsiveness::Responsive => {}
            Responsiveness::Unresponsive { timeout } => {
                tokio::time::sleep(timeout).await;
                return Err(self.lost("no answer"));
            }
            Responsiveness::Slow(d) => tokio::time::sleep(d).await,
            Responsiveness::Lossy { every } => {
                if every > 0 && n.is_multiple_of(every) {
                    return Err(self.lost("packet lost"));
                }
            }
        }
        Ok(f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner())))
    }
}

impl PowerControl for SimPower {
    fn is_on(&self) -> PowerFuture<'_, bool> {
        Box::pin(self.op(|s| s.on))
    }

    fn set_power(&self, action: PowerAction) -> PowerFuture<'_, ()> {
        Box::pin(self.op(move |s| {
            s.on = match action {
                PowerAction::On | PowerAction::Cycle | PowerAction::HardReset => true,
                PowerAction::Off | PowerAction::SoftShutdown => false,
            };
            s.log.push(format!("{action:?}"));
        }))
    }

    fn set_boot_device(
        &self,
        device: BootDevice,
        efi: bool,
        persistent: bool,
    ) -> PowerFuture<'_, ()> {
        Box::pin(self.op(move |s| {
            s.boot = Some((device, efi, persistent));
            s.log.push(format!("boot {device:?}"));
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_simulator_obeys_and_fails_on_demand() {
        let bmc = SimPower::new("sim-bmc");
        bmc.set_boot_device(BootDevice::Pxe, false, false)
            .await
            .unwrap();
        bmc.set_power(PowerAction::On).await.unwrap();
        assert!(bmc.is_on().await.unwrap());
        assert_eq!(bmc.log(), vec!["boot Pxe", "On"]);

        bmc.set_responsiveness(Responsiveness::Unresponsive {
            timeout: Duration::from_secs(5),
        });
        let start = tokio::time::Instant::now();
        let e = bmc.set_power(PowerAction::Off).await.unwrap_err();
        assert!(matches!(e, PowerError::Unreachable { .. }), "{e}");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!(bmc.powered_on(), "an unanswered call changes nothing");

        bmc.set_responsiveness(Responsiveness::Slow(Duration::from_secs(2)));
        let start = tokio::time::Instant::now();
        bmc.set_power(PowerAction::Off).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(2));
        assert!(!bmc.powered_on());

        bmc.set_responsiveness(Responsiveness::Lossy { every: 2 });
        let results: Vec<bool> = [
            bmc.is_on().await.is_ok(),
            bmc.is_on().await.is_ok(),
            bmc.is_on().await.is_ok(),
            bmc.is_on().await.is_ok(),
        ]
        .into();
        assert_eq!(results.iter().filter(|ok| !**ok).count(), 2, "{results:?}");
    }

    #[test]
    fn the_ipmi_implementation_never_prints_the_password() {
        let p = IpmiPower::new(
            "127.0.0.1:623".parse().unwrap(),
            "admin".into(),
            Secret::new(b"hunter2".to_vec()),
            ConnectOptions::default(),
        );
        let s = format!("{p:?}");
        assert!(s.contains("127.0.0.1:623") && !s.contains("hunter2"), "{s}");
    }
}
