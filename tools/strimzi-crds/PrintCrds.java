// Prints, as one YAML stream, the Strimzi CustomResourceDefinitions of the kinds Cake's prod
// overlay uses, built by Strimzi's own API artifact (io.strimzi:api, see pom.xml). Run with the
// artifact and its dependencies on the class path:
//   java -cp '<dir>/*' tools/strimzi-crds/PrintCrds.java > strimzi-crds.yaml
import io.fabric8.kubernetes.client.utils.Serialization;
import io.strimzi.api.kafka.Crds;

public class PrintCrds {
    public static void main(String[] args) {
        // Kafka, KafkaNodePool and KafkaTopic (k8s/components/strimzi-kafka).
        var definitions = java.util.List.of(Crds.kafka(), Crds.kafkaNodePool(), Crds.kafkaTopic());
        for (var definition : definitions) {
            System.out.print(Serialization.asYaml(definition));
        }
    }
}
