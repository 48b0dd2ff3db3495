//! Encoding of an `Init` (or `Claim`) spec, its security and startup
//! parts, and of the startup frames.

use super::{Dec, Enc};
use crate::{InitFile, InitSpec, Probe, ProbeCheck, RunAs, StartupState, WireError};

impl Enc<'_> {
    pub(super) fn init(&mut self, spec: &InitSpec) {
        self.strs(&spec.argv);
        self.env(&spec.env);
        self.str(&spec.cwd);
        self.u32(spec.files.len() as u32);
        for f in &spec.files {
            self.str(&f.path);
            self.u32(f.mode);
            self.bytes(&f.content);
        }
        self.run_as(&spec.run_as);
        self.opt_u64(spec.capabilities);
        self.probe(spec.startup_probe.as_ref());
    }

    pub(super) fn run_as(&mut self, v: &RunAs) {
        self.str(&v.user);
        self.str(&v.group);
    }

    pub(super) fn opt_u64(&mut self, v: Option<u64>) {
        match v {
            None => self.u8(0),
            Some(n) => {
                self.u8(1);
                self.u64(n);
            }
        }
    }

    pub(super) fn probe(&mut self, v: Option<&Probe>) {
        let Some(p) = v else {
            self.u8(0);
            return;
        };
        match &p.check {
            ProbeCheck::Exec(argv) => {
                self.u8(1);
                self.strs(argv);
            }
            ProbeCheck::Tcp { port } => {
                self.u8(2);
                self.u16(*port);
            }
            ProbeCheck::Http { port, path } => {
                self.u8(3);
                self.u16(*port);
                self.str(path);
            }
        }
        self.u32(p.initial_delay_ms);
        self.u32(p.period_ms);
        self.u32(p.timeout_ms);
        self.u32(p.failure_threshold);
    }

    pub(super) fn startup(&mut self, v: &StartupState) {
        match v {
            StartupState::Ready => self.u8(0),
            StartupState::Failed(why) => {
                self.u8(1);
                self.str(why);
            }
        }
    }
}

impl Dec<'_> {
    pub(super) fn init(&mut self) -> Result<InitSpec, WireError> {
        let argv = self.strs()?;
        let env = self.env()?;
        let cwd = self.str()?;
        let n = self.count()?;
        let mut files = Vec::with_capacity(n);
        for _ in 0..n {
            files.push(InitFile {
                path: self.str()?,
                mode: self.u32()?,
                content: self.bytes()?,
            });
        }
        Ok(InitSpec {
            argv,
            env,
            cwd,
            files,
            run_as: self.run_as()?,
            capabilities: self.opt_u64()?,
            startup_probe: self.probe()?,
        })
    }

    pub(super) fn run_as(&mut self) -> Result<RunAs, WireError> {
        Ok(RunAs {
            user: self.str()?,
            group: self.str()?,
        })
    }

    pub(super) fn opt_u64(&mut self) -> Result<Option<u64>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.u64()?)),
            _ => Err(WireError::Malformed("optional integer")),
        }
    }

    pub(super) fn probe(&mut self) -> Result<Option<Probe>, WireError> {
        let check = match self.u8()? {
            0 => return Ok(None),
            1 => ProbeCheck::Exec(self.strs()?),
            2 => ProbeCheck::Tcp { port: self.u16()? },
            3 => ProbeCheck::Http {
                port: self.u16()?,
                path: self.str()?,
            },
            _ => return Err(WireError::Malformed("probe kind")),
        };
        Ok(Some(Probe {
            check,
            initial_delay_ms: self.u32()?,
            period_ms: self.u32()?,
            timeout_ms: self.u32()?,
            failure_threshold: self.u32()?,
        }))
    }

    pub(super) fn startup(&mut self) -> Result<StartupState, WireError> {
        match self.u8()? {
            0 => Ok(StartupState::Ready),
            1 => Ok(StartupState::Failed(self.str()?)),
            _ => Err(WireError::Malformed("startup state")),
        }
    }
}
