// Healthcheck of the optional HAPI FHIR server in docker-compose.yml (profile "fhir").
//
// hapiproject/hapi is a distroless image: no shell, no curl, no wget, only java. Docker runs this file with
// the JDK's single-file source launcher (`java FhirHealthCheck.java URL`, compiled in memory; the image's
// runtime carries the jdk.compiler module). Exit status 0 when GET URL answers 200 with a
// CapabilityStatement, 1 otherwise.

import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

public class FhirHealthCheck {
    public static void main(String[] args) {
        String url = args.length > 0 ? args[0] : "http://localhost:8080/fhir/metadata";
        try {
            HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build();
            HttpRequest request = HttpRequest.newBuilder(URI.create(url))
                    .timeout(Duration.ofSeconds(10))
                    .header("Accept", "application/fhir+json")
                    .GET()
                    .build();
            HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
            if (response.statusCode() == 200 && response.body().contains("\"CapabilityStatement\"")) {
                System.exit(0);
            }
            System.err.println("FHIR server unhealthy: HTTP " + response.statusCode() + " from " + url);
        } catch (Exception e) {
            System.err.println("FHIR server unhealthy: " + e);
        }
        System.exit(1);
    }
}
