//! ResourceClaimTemplates for vfplane's VFs, as the demo, the DRA scenarios
//! and the campaigns write them: one request of DeviceClass
//! `vf.vfplane.io`.

use vfplane_proto::dra::DEVICE_CLASS;

/// A ResourceClaimTemplate `name` whose request `request` asks for `count`
/// VFs matching the CEL `selector`, then `devices_tail`: more of
/// `spec.spec.devices` (`constraints:`, `config:`), indented six spaces,
/// or empty.
pub fn vf_claim_template(
    name: &str,
    request: &str,
    count: u32,
    selector: &str,
    devices_tail: &str,
) -> String {
    let tail = if devices_tail.is_empty() {
        String::new()
    } else {
        format!("\n{}", devices_tail.trim_end())
    };
    format!(
        r#"apiVersion: resource.k8s.io/v1
kind: ResourceClaimTemplate
metadata:
  name: {name}
spec:
  spec:
    devices:
      requests:
        - name: {request}
          exactly:
            deviceClassName: {DEVICE_CLASS}
            allocationMode: ExactCount
            count: {count}
            selectors:
              - cel:
                  expression: {selector}{tail}
"#
    )
}

/// The CEL selector of one vfplane pool.
pub fn pool_selector(pool: &str) -> String {
    format!(r#"device.attributes["vfplane.io"].pool == "{pool}""#)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_template_parses_with_its_request_and_tail() {
        let text = vf_claim_template(
            "two",
            "vfs",
            2,
            &pool_selector("fast"),
            "      constraints:\n        - requests: [\"vfs\"]\n          matchAttribute: vfplane.io/pf\n",
        );
        let template: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let devices = &template["spec"]["spec"]["devices"];
        let request = &devices["requests"][0];
        assert_eq!(request["name"], "vfs");
        assert_eq!(request["exactly"]["deviceClassName"], "vf.vfplane.io");
        assert_eq!(request["exactly"]["count"], 2);
        assert_eq!(
            request["exactly"]["selectors"][0]["cel"]["expression"],
            "device.attributes[\"vfplane.io\"].pool == \"fast\""
        );
        assert_eq!(devices["constraints"][0]["matchAttribute"], "vfplane.io/pf");
        let plain: serde_yaml::Value =
            serde_yaml::from_str(&vf_claim_template("one", "vf", 1, "true", "")).unwrap();
        assert!(plain["spec"]["spec"]["devices"].get("constraints").is_none());
    }
}
