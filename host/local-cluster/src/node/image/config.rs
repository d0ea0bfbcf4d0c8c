//! An image's config (the OCI image-spec `config` blob) and how a container's spec combines with
//! it, by the rules a kubelet and containerd apply: `command` replaces the entrypoint, `args`
//! replace the cmd, the image's `Env` comes first, `WorkingDir` when the container names none,
//! `User` looked up in the image's own `/etc/passwd` and `/etc/group`.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// The image config file: what the store keeps of it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub(crate) struct ConfigFile {
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub config: Option<RunConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// How containers of the image run unless their spec says otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct RunConfig {
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub(crate) struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl RunConfig {
    /// The process to run: Kubernetes' rules for `command` and `args` against the image's
    /// entrypoint and cmd. An empty result is containerd's "no command specified".
    pub fn argv(&self, command: Option<&[String]>, args: Option<&[String]>) -> Result<Vec<String>, String> {
        let command = command.filter(|c| !c.is_empty());
        let args = args.filter(|a| !a.is_empty());
        let image_entrypoint = self.entrypoint.as_deref().unwrap_or_default();
        let image_cmd = self.cmd.as_deref().unwrap_or_default();
        let argv: Vec<String> = match (command, args) {
            (Some(cmd), args) => cmd.iter().chain(args.unwrap_or_default()).cloned().collect(),
            (None, Some(args)) => image_entrypoint.iter().chain(args).cloned().collect(),
            (None, None) => image_entrypoint.iter().chain(image_cmd).cloned().collect(),
        };
        if argv.is_empty() {
            return Err("failed to generate container spec: no command specified".into());
        }
        Ok(argv)
    }

    /// The image's environment as pairs (an entry without `=` is a name with an empty value).
    pub fn env(&self) -> Vec<(String, String)> {
        self.env
            .iter()
            .flatten()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (e.clone(), String::new()),
            })
            .collect()
    }
}

/// A container's user as containerd resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct User {
    pub uid: u32,
    pub gid: u32,
    /// The home directory of the uid's passwd entry (`HOME` when the environment has none).
    pub home: Option<String>,
    /// Supplementary groups: the primary gid, then every group of the image's `/etc/group`
    /// that lists the user's name as a member (containerd's `WithAdditionalGIDs`, which adds the
    /// primary gid since CVE-2023-25173).
    pub groups: Vec<u32>,
}

/// One line of `/etc/passwd` or `/etc/group`: name, numeric id, for passwd the primary gid
/// and home directory, for group its members.
struct Entry {
    name: String,
    id: u32,
    gid: u32,
    home: String,
    members: Vec<String>,
}

fn read_entries(rootfs: &Path, file: &str) -> Vec<Entry> {
    let Ok(text) = std::fs::read_to_string(rootfs.join(file)) else { return Vec::new() };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let id = f.get(2)?.parse().ok()?;
            Some(Entry {
                name: f[0].to_owned(),
                id,
                gid: f.get(3).and_then(|g| g.parse().ok()).unwrap_or(0),
                home: f.get(5).map_or_else(String::new, |h| (*h).to_owned()),
                members: f.get(3).map_or_else(Vec::new, |m| {
                    m.split(',').filter(|n| !n.is_empty()).map(|n| n.trim().to_owned()).collect()
                }),
            })
        })
        .collect()
}

/// Resolves `user` (`name`, `uid`, `name:group`, `uid:gid`, ...) against the image's
/// `/etc/passwd` and `/etc/group` as containerd's `WithUser` does: a numeric uid need not exist
/// (its gid is then 0), a name must; the errors are containerd's.
pub(crate) fn resolve_user(rootfs: &Path, user: &str) -> Result<User, String> {
    let passwd = read_entries(rootfs, "etc/passwd");
    let group = read_entries(rootfs, "etc/group");
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let entry = match user_part.parse::<u32>() {
        Ok(uid) => passwd.iter().find(|e| e.id == uid),
        Err(_) => Some(
            passwd
                .iter()
                .find(|e| e.name == user_part)
                .ok_or_else(|| format!("unable to find user {user_part}: no matching entries in passwd file"))?,
        ),
    };
    let uid = user_part.parse::<u32>().unwrap_or_else(|_| entry.map_or(0, |e| e.id));
    let gid = match group_part {
        None => entry.map_or(0, |e| e.gid),
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => group
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.id)
                .ok_or_else(|| format!("unable to find group {g}: no matching entries in group file"))?,
        },
    };
    let home = passwd.iter().find(|e| e.id == uid).map(|e| e.home.clone()).filter(|h| !h.is_empty());
    // Memberships go by name: a numeric uid without a passwd entry has none.
    let name = entry.map(|e| e.name.as_str()).filter(|n| !n.is_empty());
    let mut groups = vec![gid];
    if let Some(name) = name {
        for g in &group {
            if g.members.iter().any(|m| m == name) && !groups.contains(&g.id) {
                groups.push(g.id);
            }
        }
    }
    Ok(User { uid, gid, home, groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| (*x).to_owned()).collect()
    }

    #[test]
    fn command_and_args_combine_with_entrypoint_and_cmd_as_kubernetes_says() {
        let cfg = RunConfig {
            entrypoint: Some(strings(&["/ep"])),
            cmd: Some(strings(&["cmd1", "cmd2"])),
            ..Default::default()
        };
        let c = strings(&["/bin/c"]);
        let a = strings(&["a1"]);
        assert_eq!(cfg.argv(None, None).unwrap(), strings(&["/ep", "cmd1", "cmd2"]));
        assert_eq!(cfg.argv(Some(&c), None).unwrap(), strings(&["/bin/c"]));
        assert_eq!(cfg.argv(None, Some(&a)).unwrap(), strings(&["/ep", "a1"]));
        assert_eq!(cfg.argv(Some(&c), Some(&a)).unwrap(), strings(&["/bin/c", "a1"]));
        // Empty lists count as absent, as the kubelet treats them.
        assert_eq!(cfg.argv(Some(&[]), Some(&[])).unwrap(), strings(&["/ep", "cmd1", "cmd2"]));
        assert_eq!(
            RunConfig::default().argv(None, None).unwrap_err(),
            "failed to generate container spec: no command specified"
        );
    }

    #[test]
    fn users_resolve_in_the_images_passwd_and_group() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1234:2345:App:/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.path().join("etc/group"), "root:x:0:\nstaff:x:50:\nusers:x:100:other,app\napp:x:2345:\n")
            .unwrap();
        let r = |u: &str| resolve_user(root.path(), u);
        let app = User { uid: 1234, gid: 2345, home: Some("/home/app".into()), groups: vec![2345, 100] };
        assert_eq!(r("app").unwrap(), app);
        // A uid with a passwd entry has that name's memberships.
        assert_eq!(r("1234").unwrap(), app);
        assert_eq!(r("777").unwrap(), User { uid: 777, gid: 0, home: None, groups: vec![0] });
        assert_eq!(r("app:staff").unwrap().gid, 50);
        assert_eq!(r("app:staff").unwrap().groups, vec![50, 100]);
        assert_eq!(r("777:88").unwrap(), User { uid: 777, gid: 88, home: None, groups: vec![88] });
        assert_eq!(r("nobody").unwrap_err(), "unable to find user nobody: no matching entries in passwd file");
        assert_eq!(r("app:wheel").unwrap_err(), "unable to find group wheel: no matching entries in group file");
    }

    #[test]
    fn env_entries_split_at_the_first_equals_sign() {
        let cfg = RunConfig { env: Some(strings(&["A=1=2", "B", "PATH=/x"])), ..Default::default() };
        assert_eq!(
            cfg.env(),
            vec![("A".into(), "1=2".into()), ("B".into(), String::new()), ("PATH".into(), "/x".into())]
        );
    }
}
