use super::overridden;
use std::collections::BTreeMap;

#[test]
fn overridden_properties_are_named_and_matching_ones_are_not() {
    let props = |kv: &[(&str, &str)]| {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>()
    };
    let w = overridden(&props(&[
        ("enable.partition.eof", "true"),
        ("fetch.wait.max.ms", "10"),
    ]));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("kafka.properties.\"enable.partition.eof\" = \"true\" is ignored"),
        "{}",
        w[0]
    );
    assert!(w[0].contains("remove it from the config"), "{}", w[0]);
    let w = overridden(&props(&[
        ("enable.auto.commit", "true"),
        ("enable.auto.offset.store", "false"),
    ]));
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("enable.auto.commit"), "{}", w[0]);
    assert!(overridden(&props(&[
        ("enable.partition.eof", "false"),
        ("group.id", "g")
    ]))
    .is_empty());
}
